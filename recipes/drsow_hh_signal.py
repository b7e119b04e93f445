"""Does DrSow carry a real preference signal? A CPU-sized check on Anthropic HH-RLHF (harmless).

1. The pairs are split into training and held-out pairs; a byte-level BPE tokenizer is trained on the training
   text.
2. weak: a tiny Llama causal LM trained on every training response (chosen and rejected) after its context,
   the loss on the response tokens only (warm-up, then cosine decay).
3. strong: a copy of weak fine-tuned on the chosen responses only.
4. On the held-out pairs, ``rh_trl.DrSow(strong, weak)`` scores both responses; the accuracy of ranking chosen
   above rejected is reported with a Wilson 95% interval and an exact two-sided binomial p-value against 0.5,
   for ``reduction="sum"`` and ``"mean"``, and split by whether the chosen response is the shorter one (the
   sum grows with length, and HH-harmless's chosen responses are shorter more often than not).

The context is the last human turn by default (``--context full`` keeps the whole dialogue, cut from the
left); the same context is used for training and scoring.

    python recipes/drsow_hh_signal.py ../shared/data/hh-rlhf-harmless/pairs.jsonl.gz
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

from rh_trl.data.preferences import PreferenceDataError, read_records, split_pairs, to_pair  # noqa: E402
from rh_trl.formatting import ChatFormatter, to_sample  # noqa: E402
from rh_trl.models.offline import bpe_tokenizer, tiny_causal_lm  # noqa: E402
from rh_trl.rewards.drsow import DrSow  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", help="pairs.jsonl.gz of hh-rlhf-harmless (HH text format)")
    parser.add_argument("--eval-pairs", type=int, default=500, help="held-out pairs")
    parser.add_argument("--train-pairs", type=int, default=None, help="cap on training pairs (default: all)")
    parser.add_argument("--context", choices=["last-turn", "full"], default="last-turn")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence (context cut first)")
    parser.add_argument("--weak-epochs", type=float, default=3)
    parser.add_argument("--strong-epochs", type=float, default=2)
    parser.add_argument("--weak-lr", type=float, default=3e-3)
    parser.add_argument("--strong-lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadiest on shared cores)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


# -- data ----------------------------------------------------------------------------------------------------------


def load_pairs(path: str) -> list[dict[str, Any]]:
    pairs = []
    for i, record in enumerate(read_records(path)):
        try:
            pairs.append(to_pair(record, "hh", i))
        except PreferenceDataError as err:  # a few HH rows differ before the last turn
            print(f"skipped: {err}")
    return pairs


def with_context(pair: dict[str, Any], context: str) -> dict[str, Any]:
    """The pair with its prompt cut to the last human turn (``context="last-turn"``) or left whole."""
    if context == "full":
        return pair
    users = [m for m in pair["prompt"] if m["role"] == "user"]
    return {**pair, "prompt": users[-1:]}


def examples(pairs, sides: tuple[str, ...], formatter: ChatFormatter) -> list[tuple[list[int], int]]:
    """``(input_ids, response_start)`` of each pair's response(s), rendered exactly as DrSow renders them."""
    out = []
    for pair in pairs:
        for side in sides:
            encoded = formatter.encode(to_sample(pair["prompt"], pair[side]))
            if encoded.response_start is not None and encoded.response_start < len(encoded.input_ids):
                out.append((encoded.input_ids, encoded.response_start))
    return out


def collate(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids; labels only on the response tokens (the context is conditioned on, not learned)."""
    longest = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), longest), pad_id)
    labels = torch.full((len(batch), longest), -100)
    mask = torch.zeros_like(ids)
    for i, (seq, start) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, start : len(seq)] = ids[i, start : len(seq)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(data: list, batch_size: int, rng: random.Random) -> list[list]:
    """One epoch of batches of similar lengths, in random order."""
    order = list(range(len(data)))
    rng.shuffle(order)
    out = []
    for i in range(0, len(order), batch_size * 32):  # sort within large random chunks: little padding
        chunk = sorted(order[i : i + batch_size * 32], key=lambda j: len(data[j][0]))
        out += [[data[j] for j in chunk[k : k + batch_size]] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


# -- training --------------------------------------------------------------------------------------------------------


def train(
    model, data, epochs: float, lr: float, batch_size: int, pad_id: int, seed: int
) -> tuple[int, float]:
    """AdamW on the response tokens of ``data`` for ``epochs`` (warm-up, cosine decay); (steps, last loss)."""
    rng = random.Random(seed)
    plan: list[list] = []
    while len(plan) < epochs * math.ceil(len(data) / batch_size):
        plan += batches(data, batch_size, rng)
    plan = plan[: max(1, round(epochs * math.ceil(len(data) / batch_size)))]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = get_cosine_schedule_with_warmup(opt, max(1, len(plan) // 20), len(plan))
    model.train()
    losses = []
    for batch in plan:
        loss = model(**collate(batch, pad_id)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return len(plan), sum(losses[-20:]) / len(losses[-20:])


@torch.no_grad()
def response_loss(model, data, pad_id: int) -> float:
    """Mean next-token loss over the response tokens of ``data`` (nats per token)."""
    total, count = 0.0, 0
    ordered = sorted(data, key=lambda x: len(x[0]))
    for k in range(0, len(ordered), 64):
        batch = collate(ordered[k : k + 64], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum"
        )
        total += losses.item()
        count += int((targets != -100).sum())
    return total / count


# -- statistics -------------------------------------------------------------------------------------------------------


def wilson(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n trials against p = 0.5."""
    probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-9)))


def report(label: str, outcomes: list[float]) -> str:
    """Accuracy (ties count one half), Wilson 95% CI and binomial p of a list of 1 / 0.5 / 0 outcomes."""
    n = len(outcomes)
    if n == 0:
        return f"{label}: no pairs"
    k = sum(outcomes)
    lo, hi = wilson(k, n)
    p = binomial_two_sided(round(k), n)
    return f"{label}: {k:g}/{n} = {k / n:.3f} (Wilson 95% CI {lo:.3f}-{hi:.3f}; binomial p = {p:.2g})"


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pairs = load_pairs(args.data)
    train_pairs, eval_pairs = split_pairs(pairs, args.eval_pairs / len(pairs), seed=args.seed)
    train_pairs = train_pairs[: args.train_pairs]
    train_pairs = [with_context(p, args.context) for p in train_pairs]
    eval_pairs = [with_context(p, args.context) for p in eval_pairs]
    texts = [m["content"] for p in train_pairs for m in [*p["prompt"], *p["chosen"], *p["rejected"]]]
    tok = bpe_tokenizer("llama", vocab_size=args.vocab_size, corpus=texts)
    formatter = ChatFormatter(tok, max_length=args.max_length)
    everything = examples(train_pairs, ("chosen", "rejected"), formatter)
    chosen = examples(train_pairs, ("chosen",), formatter)
    held_chosen = examples(eval_pairs, ("chosen",), formatter)
    held_rejected = examples(eval_pairs, ("rejected",), formatter)
    tokens = sum(len(ids) - start for ids, start in everything)
    print(
        f"{len(pairs)} pairs: {len(train_pairs)} for training, {len(eval_pairs)} held out; context: "
        f"{args.context}; vocab {len(tok)}; {tokens} response tokens in training"
    )

    pad = tok.pad_token_id
    weak = tiny_causal_lm(tok, seed=args.seed, layers=args.layers, hidden=args.hidden)
    steps, loss = train(weak, everything, args.weak_epochs, args.weak_lr, args.batch_size, pad, args.seed)
    print(
        f"weak: {steps} steps ({args.weak_epochs:g} epochs) on {len(everything)} responses, train loss {loss:.3f}; "
        f"held-out loss chosen {response_loss(weak, held_chosen, pad):.3f}, "
        f"rejected {response_loss(weak, held_rejected, pad):.3f}  [{time.perf_counter() - t0:.0f} s]"
    )
    strong = copy.deepcopy(weak)
    steps, loss = train(
        strong, chosen, args.strong_epochs, args.strong_lr, args.batch_size, pad, args.seed + 1
    )
    print(
        f"strong: weak + {steps} steps ({args.strong_epochs:g} epochs) on {len(chosen)} chosen responses, train "
        f"loss {loss:.3f}; held-out loss chosen {response_loss(strong, held_chosen, pad):.3f}, "
        f"rejected {response_loss(strong, held_rejected, pad):.3f}  [{time.perf_counter() - t0:.0f} s]"
    )

    prompts = [p["prompt"] for p in eval_pairs]
    chars = [(len(p["chosen"][0]["content"]), len(p["rejected"][0]["content"])) for p in eval_pairs]
    shorter = [c < r for c, r in chars]
    print(
        report(
            "length alone (the shorter response wins)",
            [1.0 if c < r else 0.5 if c == r else 0.0 for c, r in chars],
        )
    )
    for reduction in ("sum", "mean"):
        drsow = DrSow(
            strong,
            weak,
            strong_tokenizer=tok,
            weak_tokenizer=tok,
            reduction=reduction,
            max_length=args.max_length,
            device="cpu",
        )
        r_chosen = drsow(prompts, [p["chosen"] for p in eval_pairs])
        r_rejected = drsow(prompts, [p["rejected"] for p in eval_pairs])
        outcomes: list[float | None] = [
            None if c is None or r is None else 1.0 if c > r else 0.5 if c == r else 0.0
            for c, r in zip(r_chosen, r_rejected, strict=True)
        ]
        scored = [o for o in outcomes if o is not None]
        unscored = len(outcomes) - len(scored)
        print(report(f"DrSow ({reduction}), chosen above rejected", scored) + f"; {unscored} unscored")
        for label, keep in (("chosen shorter", True), ("chosen not shorter", False)):
            part = [o for o, s in zip(outcomes, shorter, strict=True) if o is not None and s == keep]
            print("    " + report(label, part))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
