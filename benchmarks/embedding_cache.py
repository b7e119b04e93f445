"""Embedding HH responses with rh_trl's TextEncoder against sentence-transformers, and again from the cache.

The obvious alternative is ``SentenceTransformer(...).encode(texts, batch_size=32)`` on the same rendered
texts (it also sorts by length). rh_trl's encoder cuts micro-batches by a token budget; its second pass over the
same samples reads every vector from the on-disk cache. Vectors are compared on the samples that fit in 256
tokens (sentence-transformers cuts longer ones from the right, rh_trl from the left of the prompt).

    python benchmarks/embedding_cache.py                 # 256 responses of the HH held-out pairs
    python benchmarks/embedding_cache.py --num 512 --prompt-turns 1
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from rh_trl.data.preferences import load_pairs, split_pairs  # noqa: E402
from rh_trl.formatting import to_sample  # noqa: E402
from rh_trl.rewards.text_encoder import TextEncoder, resolve_source  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless/pairs.jsonl.gz"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--num", type=int, default=256, help="responses to embed")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--prompt-turns", type=int, default=None)
    parser.add_argument("--max-tokens-per-batch", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    held_out = split_pairs(load_pairs(args.data, "hh", skip_invalid=True), 0.2, 0)[1]
    samples = [to_sample(p["prompt"], p[side]) for p in held_out for side in ("chosen", "rejected")]
    samples = samples[: args.num]
    with tempfile.TemporaryDirectory() as cache_dir:
        encoder = TextEncoder(
            "rh_trl:minilm",
            max_length=args.max_length,
            prompt_turns=args.prompt_turns,
            max_tokens_per_batch=args.max_tokens_per_batch,
            device="cpu",
        )
        texts = [encoder.formatter.render(encoder.prepare(s))[0] for s in samples]
        st = SentenceTransformer(resolve_source("rh_trl:minilm"), device="cpu")
        st.max_seq_length = args.max_length
        st.encode(texts[:8], batch_size=32)  # warm-up
        encoder.embed(samples[:8])
        reference, st_seconds = timed(lambda: st.encode(texts, batch_size=32, convert_to_tensor=True).cpu())
        plain, ours_seconds = timed(lambda: encoder.embed(samples))
        cached_encoder = TextEncoder(
            encoder.model,
            encoder.tokenizer,
            cache=cache_dir,
            max_tokens_per_batch=args.max_tokens_per_batch,
            **encoder.settings(),
        )
        first, first_seconds = timed(lambda: cached_encoder.embed(samples))
        second, second_seconds = timed(lambda: cached_encoder.embed(samples))
    ours = torch.stack(plain.vectors)  # type: ignore[arg-type]
    fits = [i for i, e in enumerate(plain.encoded) if e is not None and e.truncated is None]
    diff = (ours[fits] - reference[fits]).abs().max().item()
    cached_diff = (torch.stack(second.vectors) - torch.stack(first.vectors)).abs().max().item()  # type: ignore[arg-type]
    tokens = sum(len(e.input_ids) for e in plain.encoded if e is not None)
    print(
        f"{len(samples)} HH responses, {tokens} tokens, MiniLM, max_length {args.max_length}, {args.threads} threads"
    )
    print(f"sentence-transformers encode (batch 32): {st_seconds:7.2f} s")
    print(
        f"rh_trl TextEncoder, no cache:            {ours_seconds:7.2f} s  ({st_seconds / ours_seconds:.2f}x)"
    )
    print(
        f"rh_trl TextEncoder, cold cache:          {first_seconds:7.2f} s  (misses {first.counts['cache_misses']})"
    )
    print(
        f"rh_trl TextEncoder, warm cache:          {second_seconds:7.2f} s  (hits {second.counts['cache_hits']}, "
        f"misses {second.counts['cache_misses']}; {ours_seconds / second_seconds:.0f}x faster than embedding)"
    )
    print(f"max abs vector difference vs sentence-transformers ({len(fits)} untruncated samples): {diff:.2e}")
    print(f"max abs difference cached vs embedded: {cached_diff:.2e}")


if __name__ == "__main__":
    main()
