"""rh_trl.ORM against TRL's built-in reward-model path, on the same model and texts.

TRL's path is what ``GRPOTrainer(reward_funcs=[model])`` does with an ``nn.Module`` reward: render every
sample, pad the whole batch to its longest sequence, one forward pass. rh_trl.ORM scores each distinct sample
once, in length-sorted micro-batches of at most ``--max-tokens-per-batch`` padded tokens. Both are driven
through a real ``GRPOTrainer._calculate_rewards`` call.

    python benchmarks/orm_throughput.py                  # 128 completions, median ~200 tokens, max 2,000
    python benchmarks/orm_throughput.py --hidden 1024 --layers 8   # a bigger model (GPU recommended)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import conversational_batch, lognormal_lengths, measure, write_result  # noqa: E402
from datasets import Dataset  # noqa: E402

import rh_trl  # noqa: E402
from rh_trl.formatting import to_sample  # noqa: E402
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm, tiny_reward_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num", type=int, default=128, help="completions per call")
    parser.add_argument(
        "--group-size", type=int, default=8, help="completions per prompt (GRPO's num_generations)"
    )
    parser.add_argument("--median", type=int, default=200, help="median completion length in tokens")
    parser.add_argument("--max-len", type=int, default=2000, help="longest completion in tokens")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, …")
    parser.add_argument("--max-tokens-per-batch", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this JSON file (the docs plot it)")
    return parser.parse_args()


def grpo_trainer(reward, tokenizer, policy, device: torch.device, output_dir: str):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        num_generations=8,
        report_to="none",
        bf16=False,
        use_cpu=device.type == "cpu",
    )
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}] * 8)
    return GRPOTrainer(
        model=policy,
        reward_funcs=[reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_processing_classes=[tokenizer],
    )


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    tokenizer = bpe_tokenizer("llama", vocab_size=2048)
    size = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads}
    model = tiny_reward_model(tokenizer, seed=args.seed, **size).to(device=device, dtype=dtype)
    policy = tiny_causal_lm(tokenizer, layers=1, hidden=64)

    lengths = lognormal_lengths(args.num, args.median, args.max_len, seed=args.seed)
    prompts, completions = conversational_batch(tokenizer, lengths, args.group_size, seed=args.seed)
    inputs = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
    completion_ids = [tokenizer(c[0]["content"], add_special_tokens=False)["input_ids"] for c in completions]

    orm = rh_trl.ORM(
        model, tokenizer, name="orm", max_tokens_per_batch=args.max_tokens_per_batch, device=device
    )
    with tempfile.TemporaryDirectory() as tmp:
        builtin = grpo_trainer(model, tokenizer, policy, device, tmp)
        ours = grpo_trainer(orm, tokenizer, policy, device, tmp)

    def run(trainer):
        return trainer._calculate_rewards(inputs, prompts, completions, completion_ids)[:, 0].float().cpu()

    # warm up both paths on a few short samples, then measure one full call each
    for trainer in (builtin, ours):
        trainer._calculate_rewards(inputs[-4:], prompts[-4:], completions[-4:], completion_ids[-4:])
    trl_run = measure(lambda: run(builtin), device)
    ours_run = measure(lambda: run(ours), device)

    stats = orm.engine.last_stats
    seq_lengths = [
        len(orm.formatter.encode(to_sample(p, c)).input_ids)
        for p, c in zip(prompts, completions, strict=True)
    ]
    trl_efficiency = sum(seq_lengths) / (len(seq_lengths) * max(seq_lengths))
    diff = (trl_run.value - ours_run.value).abs().max().item()
    speedup = trl_run.seconds / ours_run.seconds

    print(f"device: {device} ({torch.get_num_threads()} threads), dtype {args.dtype}, reward model {size}")
    print(
        f"batch: {len(seq_lengths)} completions, sequence lengths {min(seq_lengths)}-{max(seq_lengths)} tokens, "
        f"median {sorted(seq_lengths)[len(seq_lengths) // 2]}"
    )
    print(f"{'path':<34}{'seconds':>9}{'padding eff.':>14}{'peak MB':>10}{'forwards':>10}")
    print(
        f"{'TRL built-in (nn.Module reward)':<34}{trl_run.seconds:>9.2f}{trl_efficiency:>14.2f}{trl_run.peak_mb:>10.0f}{1:>10}"
    )
    print(
        f"{'rh_trl.ORM':<34}{ours_run.seconds:>9.2f}{stats.padding_efficiency:>14.2f}{ours_run.peak_mb:>10.0f}"
        f"{stats.batches:>10}"
    )
    print(f"max abs score difference: {diff:.2e}")
    print(f"speedup (TRL seconds / rh_trl seconds): {speedup:.1f}x")
    print(f"peak memory ratio (TRL / rh_trl): {trl_run.peak_mb / max(ours_run.peak_mb, 1.0):.1f}x")
    if args.json:
        write_result(
            args.json,
            "orm_throughput",
            "TRL built-in (nn.Module reward)",
            [
                {
                    "path": "TRL built-in (nn.Module reward)",
                    "seconds": trl_run.seconds,
                    "ratio": 1.0,
                    "peak_mb": trl_run.peak_mb,
                    "padding_efficiency": trl_efficiency,
                },
                {
                    "path": "rh_trl.ORM",
                    "seconds": ours_run.seconds,
                    "ratio": speedup,
                    "peak_mb": ours_run.peak_mb,
                    "padding_efficiency": stats.padding_efficiency,
                },
            ],  # fmt: skip
            max_abs_diff=diff,
            completions=len(seq_lengths),
        )


if __name__ == "__main__":
    main()
