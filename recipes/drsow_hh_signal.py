"""Does DrSow carry a real preference signal? A CPU-sized check on Anthropic HH-RLHF (harmless).

1. A byte-level BPE tokenizer is trained on the training pairs' text.
2. weak: a tiny Llama causal LM trained for ``--weak-seconds`` on every response (chosen and rejected) in its
   dialogue context.
3. strong: a copy of weak fine-tuned for ``--strong-seconds`` on the chosen responses only.
4. On held-out pairs, DrSow(strong, weak) scores both responses; the accuracy of ranking chosen above rejected
   is reported with a Wilson 95% interval and an exact two-sided binomial p-value against 0.5.

    python recipes/drsow_hh_signal.py /work/shared/data/hh-rlhf-harmless/pairs.jsonl.gz
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from rh_trl.formatting import ChatFormatter, to_sample  # noqa: E402
from rh_trl.preference_data import PreferenceDataError, read_records, split_pairs, to_pair  # noqa: E402
from rh_trl.rewards.drsow import DrSow  # noqa: E402
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", help="pairs.jsonl.gz of hh-rlhf-harmless (HH text format)")
    parser.add_argument("--train-pairs", type=int, default=1200)
    parser.add_argument("--eval-pairs", type=int, default=300)
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--max-length", type=int, default=192, help="tokens per training sequence (left-cut)")
    parser.add_argument("--weak-seconds", type=float, default=150)
    parser.add_argument("--strong-seconds", type=float, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def sequences(pairs, keys: tuple[str, ...], formatter: ChatFormatter, max_length: int) -> list[list[int]]:
    """Each pair's dialogue with the given responses, tokenized as DrSow renders it, cut from the left."""
    out = []
    for pair in pairs:
        for key in keys:
            ids = formatter.encode(to_sample(pair["prompt"], pair[key])).input_ids
            out.append(ids[-max_length:])
    return out


def train(
    model, data: list[list[int]], seconds: float, lr: float, batch_size: int, pad_id: int, seed: int
) -> tuple[int, float]:
    """Next-token training on ``data`` for ``seconds`` of wall time; returns (steps, last mean loss)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    start, steps, losses = time.perf_counter(), 0, []
    order: list[int] = []
    while time.perf_counter() - start < seconds:
        if len(order) < batch_size:
            order = list(range(len(data)))
            rng.shuffle(order)
        batch = [data[order.pop()] for _ in range(batch_size)]
        longest = max(len(s) for s in batch)
        ids = torch.full((len(batch), longest), pad_id)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps += 1
        losses.append(loss.item())
    model.eval()
    return steps, sum(losses[-20:]) / max(1, len(losses[-20:]))


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n trials against p = 0.5."""
    probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-9)))


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    pairs = []
    for i, record in enumerate(read_records(args.data)):
        try:
            pairs.append(to_pair(record, "hh", i))
        except PreferenceDataError as err:  # a few HH rows differ before the last turn
            print(f"skipped: {err}")
    train_pairs, eval_pairs = split_pairs(pairs, args.eval_pairs / len(pairs), seed=args.seed)
    train_pairs = train_pairs[: args.train_pairs]
    texts = [m["content"] for p in train_pairs for m in [*p["prompt"], *p["chosen"], *p["rejected"]]]
    tok = bpe_tokenizer("llama", vocab_size=args.vocab_size, corpus=texts)
    formatter = ChatFormatter(tok, add_eos=False)
    everything = sequences(train_pairs, ("chosen", "rejected"), formatter, args.max_length)
    chosen = sequences(train_pairs, ("chosen",), formatter, args.max_length)
    print(
        f"{len(pairs)} pairs: {len(train_pairs)} for training, {len(eval_pairs)} held out; vocab {len(tok)}"
    )

    weak = tiny_causal_lm(tok, seed=args.seed, layers=args.layers, hidden=args.hidden)
    steps, loss = train(
        weak, everything, args.weak_seconds, 3e-3, args.batch_size, tok.pad_token_id, args.seed
    )
    print(f"weak: {steps} steps on {len(everything)} dialogues (all responses), final loss {loss:.3f}")
    strong = copy.deepcopy(weak)
    steps, loss = train(
        strong, chosen, args.strong_seconds, 1e-3, args.batch_size, tok.pad_token_id, args.seed + 1
    )
    print(
        f"strong: weak + {steps} steps on {len(chosen)} dialogues (chosen responses), final loss {loss:.3f}"
    )

    results = {}
    for reduction in ("sum", "mean"):
        drsow = DrSow(
            strong,
            weak,
            strong_tokenizer=tok,
            weak_tokenizer=tok,
            reduction=reduction,
            max_length=512,
            device="cpu",
        )
        prompts = [p["prompt"] for p in eval_pairs]
        r_chosen = drsow(prompts, [p["chosen"] for p in eval_pairs])
        r_rejected = drsow(prompts, [p["rejected"] for p in eval_pairs])
        scored = [
            (c, r) for c, r in zip(r_chosen, r_rejected, strict=True) if c is not None and r is not None
        ]
        wins = sum(1 for c, r in scored if c > r)
        ties = sum(1 for c, r in scored if c == r)
        n = len(scored)
        k = wins + ties // 2
        lo, hi = wilson(k, n)
        results[reduction] = (k, n, lo, hi, binomial_two_sided(k, n), n and ties)
        print(
            f"DrSow ({reduction}): chosen ranked above rejected on {k}/{n} held-out pairs = {k / n:.3f} "
            f"(Wilson 95% CI {lo:.3f}-{hi:.3f}; two-sided binomial p = {binomial_two_sided(k, n):.2g} vs 0.5; "
            f"{ties} ties, {len(eval_pairs) - n} unscored)"
        )
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
