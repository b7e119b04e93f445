"""rh_trl.DrSow's openai engine against one sequential request per sample, on the same two local servers.

Two OpenAI-compatible servers (rh_trl/openai_compat_server.py, each a tiny causal LM with its own tokenizer)
stand in for `vllm serve`. The baseline sends, for every sample, one /v1/completions request with
prompt_logprobs to the strong server and then one to the weak server, waiting for each answer. DrSow sends
several sequences per request, many requests at once, and both servers are asked concurrently.

    python benchmarks/drsow_throughput.py            # 128 completions, median ~120 tokens
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import torch  # noqa: E402
from common import conversational_batch, lognormal_lengths  # noqa: E402

from rh_trl.formatting import to_sample  # noqa: E402
from rh_trl.openai_compat_server import start_server  # noqa: E402
from rh_trl.rewards.drsow import DrSow  # noqa: E402
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num", type=int, default=128, help="completions per call")
    parser.add_argument("--median", type=int, default=120, help="median completion length in tokens")
    parser.add_argument("--max-len", type=int, default=600, help="longest completion in tokens")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per request (DrSow)")
    parser.add_argument(
        "--max-concurrency", type=int, default=4, help="requests in flight per server (DrSow)"
    )
    return parser.parse_args()


def sequential(drsow: DrSow, urls: dict[str, str], prompts, completions) -> list[float]:
    """The obvious client: per sample, one request to each server in turn, waiting for each answer."""
    rewards = []
    with httpx.Client(timeout=120) as client:
        for p, c in zip(prompts, completions, strict=True):
            sample = to_sample(p, c)
            total = 0.0
            for side, sign in (("strong", 1.0), ("weak", -1.0)):
                span = drsow.encoders[side].encode(sample)
                ids = span.input_ids[: span.end]
                body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0}
                entries = client.post(urls[side] + "/v1/completions", json=body).json()["choices"][0][
                    "prompt_logprobs"
                ]
                total += sign * sum(entries[t][str(ids[t])]["logprob"] for t in range(span.start, span.end))
            rewards.append(total)
    return rewards


def main() -> None:
    args = parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    strong_tok, weak_tok = bpe_tokenizer("llama"), bpe_tokenizer("chatml", vocab_size=400)
    size = {"layers": args.layers, "hidden": args.hidden}
    strong = tiny_causal_lm(strong_tok, seed=1, **size)
    weak = tiny_causal_lm(weak_tok, seed=2, **size)
    lengths = lognormal_lengths(args.num, args.median, args.max_len)
    prompts, completions = conversational_batch(strong_tok, lengths)
    with (
        start_server(strong, strong_tok, model_name="strong") as a,
        start_server(weak, weak_tok, model_name="weak") as b,
    ):
        drsow = DrSow(
            a.url,
            b.url,
            strong_tokenizer=strong_tok,
            weak_tokenizer=weak_tok,
            engine="openai",
            batch_size=args.batch_size,
            max_concurrency=args.max_concurrency,
        )
        drsow(prompts[:4], completions[:4])  # warm-up: both servers, both paths
        sequential(drsow, {"strong": a.url, "weak": b.url}, prompts[:4], completions[:4])

        start = time.perf_counter()
        baseline = sequential(drsow, {"strong": a.url, "weak": b.url}, prompts, completions)
        t_seq = time.perf_counter() - start
        start = time.perf_counter()
        scores = drsow(prompts, completions)
        t_batched = time.perf_counter() - start

    diff = max(abs(x - y) for x, y in zip(scores, baseline, strict=True))  # type: ignore[operator]
    tokens = sum(
        len(drsow.encoders["strong"].encode(to_sample(p, c)).input_ids)
        for p, c in zip(prompts, completions, strict=True)
    )
    print(
        f"{args.num} conversational completions (median {args.median} tokens, max {args.max_len}), "
        f"{tokens} strong-model tokens; two servers, {args.layers}-layer models, hidden {args.hidden}"
    )
    print(f"{'client':<52} {'seconds':>8} {'samples/s':>10}")
    print(f"{'one request per sample and model, sequential':<52} {t_seq:8.2f} {args.num / t_seq:10.1f}")
    label = f"DrSow openai engine (batch {args.batch_size}, {args.max_concurrency} in flight)"
    print(f"{label:<52} {t_batched:8.2f} {args.num / t_batched:10.1f}")
    print(f"max abs reward difference {diff:.2e}; {t_seq / t_batched:.1f}x faster")


if __name__ == "__main__":
    main()
