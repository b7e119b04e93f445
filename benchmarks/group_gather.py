"""What whole groups across processes cost: the exchange time of each reward call against its scoring time.

On two processes (torchrun, gloo; the script launches them itself), each GRPO-like call holds ``--per-rank``
completions per process in groups of ``--group`` spread over both processes, as TRL's ``RepeatSampler`` lays them
out. Every call is a trainer's call (``trainer_state`` passed), so PairwisePM fetches the other process's members
of its groups and shares its comparisons, and WithStatistics(ORM) and every reward's own statistics gather the
whole call. The processes meet at a barrier before each call, so the time a process waits in an exchange is the
exchange itself plus the other process's scoring being slower, not a head start.

    python benchmarks/group_gather.py                 # 8 calls of 16 completions per process, groups of 8
    python benchmarks/group_gather.py --per-rank 64 --group 16 --calls 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-rank", type=int, default=16, help="completions per process and call")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (num_generations)")
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per completion")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the output folder, in a launched process
    return parser.parse_args()


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from common import synthetic_completions

    import rh_trl
    from rh_trl.callbacks import WithStatistics
    from rh_trl.testing import bundled_prompts

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rewards = {
        "PairwisePM": rh_trl.PairwisePM("rh_trl:tiny-lm-chatml", name="pairpm"),
        "WithStatistics(ORM)": WithStatistics(rh_trl.ORM("rh_trl:tiny-rm", name="orm")),
    }
    total = args.per_rank * world
    prompts = [row["prompt"] for row in bundled_prompts()]
    times: dict[str, dict[str, float]] = {name: {"call": 0.0, "exchange": 0.0} for name in rewards}
    for step in range(args.calls + 1):  # the first call warms up, and is not counted
        texts = synthetic_completions(rewards["PairwisePM"].tokenizer, [args.tokens] * total, seed=step)
        everything = [prompts[(step * total + k) // args.group % len(prompts)] for k in range(total)]
        mine = slice(rank * args.per_rank, (rank + 1) * args.per_rank)
        completions = [[{"role": "assistant", "content": t}] for t in texts]
        for name, reward in rewards.items():
            exchanges = [reward._ranks, *([reward.reward._ranks] if name.startswith("With") else [])]
            before = sum(e.seconds for e in exchanges)
            dist.barrier()
            start = time.perf_counter()
            reward(
                prompts=everything[mine],
                completions=completions[mine],
                trainer_state=SimpleNamespace(global_step=step),
            )
            if step:
                times[name]["call"] += time.perf_counter() - start
                times[name]["exchange"] += sum(e.seconds for e in exchanges) - before
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps(times))
    dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            __file__, "--worker", out, "--per-rank", str(args.per_rank), "--group", str(args.group),
            "--calls", str(args.calls), "--tokens", str(args.tokens),
        ]  # fmt: skip
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    print(
        f"2 processes, {args.per_rank} completions each per call ({args.tokens} tokens), groups of {args.group} "
        f"spread over both, {args.calls} calls"
    )
    print(f"{'reward':<22}{'call, ms':>10}{'exchange, ms':>14}{'exchange / call':>17}")
    for name in results[0]:
        call = max(r[name]["call"] for r in results) / args.calls * 1000
        exchange = max(r[name]["exchange"] for r in results) / args.calls * 1000
        print(f"{name:<22}{call:>10.1f}{exchange:>14.1f}{exchange / call:>16.1%}")


if __name__ == "__main__":
    main()
