"""A reward model's memory per process in a DeepSpeed ZeRO-3 run: sharded (``zero3=True``) against a whole copy.

Builds a random Llama sequence-classification reward model (``--hidden``, ``--layers``, ``--vocab``; float32),
then launches two CPU processes with ``configs/accelerate/cpu_zero3.yaml`` (``DS_ACCELERATOR=cpu``) once per mode.
Each process loads ``rh_trl.ORM(path, zero3=…)`` and scores one trainer-style call of 16 completions; it reports the
parameter bytes it holds and its resident memory (RSS) growth after the load and after the call. Both modes'
rewards are compared.

    python benchmarks/sharded_reward_memory.py                       # ~136M parameters (544 MB in float32)
    python benchmarks/sharded_reward_memory.py --hidden 2048 --layers 16
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # model dir, mode, output file
    return parser.parse_args()


def rss_bytes() -> int:
    """Resident memory, after handing freed heap memory back to the system (glibc keeps it otherwise)."""
    import ctypes

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def worker(model_dir: str, mode: str, output: str) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    import rh_trl
    from rh_trl.engines.zero3 import parameter_bytes
    from rh_trl.testing import bundled_prompts

    torch.set_num_threads(1)
    Accelerator()  # the run's state and ZeRO-3 config, as a trainer has them
    rank = dist.get_rank()
    base = rss_bytes()
    orm = rh_trl.ORM(model_dir, name="rm", zero3=mode == "sharded")
    loaded = rss_bytes()
    prompts = [row["prompt"] for row in bundled_prompts()[:16]]
    completions = [[{"role": "assistant", "content": f"Answer number {k}, briefly."}] for k in range(16)]
    mine = slice(8 * rank, 8 * rank + 8)
    rewards = orm(
        prompts=prompts[mine], completions=completions[mine], trainer_state=SimpleNamespace(global_step=0)
    )
    gc.collect()
    held, whole = parameter_bytes(orm.engine.module)
    result = {"held": held, "whole": whole, "load_rss": loaded - base, "call_rss": rss_bytes() - base}
    Path(f"{output}.{rank}").write_text(json.dumps({**result, "rewards": rewards}))


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(*args.worker)
    import torch
    from transformers import LlamaForSequenceClassification

    from rh_trl.testing import tiny_llama_config, tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer("tiny-rm")
        config = tiny_llama_config(
            tokenizer, num_labels=1, hidden=args.hidden, layers=args.layers, heads=args.hidden // 64,
            intermediate_size=int(args.hidden * 2.75), vocab_size=args.vocab,
        )  # fmt: skip
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config)
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        results = {}
        for mode in ("whole", "sharded"):
            output = str(Path(tmp) / mode)
            command = [
                sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs/accelerate/cpu_zero3.yaml"), "--main_process_port", "0", __file__,
                "--worker", tmp, mode, output,
            ]  # fmt: skip
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
            subprocess.run(command, check=True, env=env, capture_output=True)
            results[mode] = [json.loads(Path(f"{output}.{rank}").read_text()) for rank in range(2)]
    mib = 2**20
    print(f"reward model: {parameters / 1e6:.0f}M parameters, float32; 2 processes, ZeRO-3 on CPU")
    print(f"{'per process (max of 2)':<26}{'whole copy':>12}{'sharded':>12}{'ratio':>8}")
    for key, label in (
        ("held", "parameter MiB"),
        ("load_rss", "RSS after load, MiB"),
        ("call_rss", "RSS after a call"),
    ):
        whole = max(r[key] for r in results["whole"]) / mib
        sharded = max(r[key] for r in results["sharded"]) / mib
        print(f"{label:<26}{whole:>12.0f}{sharded:>12.0f}{sharded / whole:>8.2f}")
    diff = max(
        abs(a - b)
        for rank in range(2)
        for a, b in zip(results["whole"][rank]["rewards"], results["sharded"][rank]["rewards"], strict=True)
    )
    print(f"max |sharded - whole| reward: {diff:.1e}")


if __name__ == "__main__":
    main()
