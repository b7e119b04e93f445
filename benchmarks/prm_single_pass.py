"""Next-token PRMs (RLHFlow style): every step from one forward pass vs one forward pass per step.

A next-token PRM judges step k from the logits that predict the assistant's "+" after step k. The usual
scoring loop renders the conversation up to step k and runs one forward pass per step; rh_trl.PRM renders the
whole conversation once and reads every step's logits from one pass (causal attention makes the numbers the
same). Compared on the same causal LM and the same responses of ``--steps`` steps:

* per-step loop: one unbatched forward pass per (sample, step), as in the reference scoring scripts;
* per-step, batched: the same per-step prefixes through rh_trl's HFEngine (same micro-batching as rh_trl.PRM);
* rh_trl.PRM: one sequence per sample.

    python benchmarks/prm_single_pass.py                     # 32 samples x 8 steps, 4-layer model
    python benchmarks/prm_single_pass.py --steps 16 --hidden 512
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import measure, synthetic_completions  # noqa: E402

import rh_trl  # noqa: E402
from rh_trl.engines.hf import HFEngine  # noqa: E402
from rh_trl.rewards.prm import PRM  # noqa: E402
from rh_trl.testing import bpe_tokenizer, bundled_prompts, tiny_causal_lm  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num", type=int, default=32, help="responses")
    parser.add_argument("--steps", type=int, default=8, help="steps per response")
    parser.add_argument("--step-tokens", type=int, default=24, help="median tokens per step")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def conversation(prompt: str, steps: list[str]) -> list[dict]:
    conv = [{"role": "user", "content": prompt + " " + steps[0]}, {"role": "assistant", "content": "+"}]
    for step in steps[1:]:
        conv += [{"role": "user", "content": step}, {"role": "assistant", "content": "+"}]
    return conv


def main() -> None:
    args = parse_args()
    rng = random.Random(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = bpe_tokenizer("llama", vocab_size=2048)
    model = tiny_causal_lm(tok, seed=args.seed, layers=args.layers, hidden=args.hidden, heads=args.heads)
    model = model.to(device).eval()
    plus, minus = tok.encode("+", add_special_tokens=False)[0], tok.encode("-", add_special_tokens=False)[0]
    header = tok.convert_tokens_to_ids("<|assistant|>")

    rows = bundled_prompts()
    prompts = [rows[i % len(rows)]["prompt"][-1]["content"] for i in range(args.num)]
    lengths = [
        max(4, round(rng.lognormvariate(0, 0.4) * args.step_tokens)) for _ in range(args.num * args.steps)
    ]
    texts = synthetic_completions(tok, lengths, seed=args.seed)
    step_lists = [[t.strip() for t in texts[i * args.steps : (i + 1) * args.steps]] for i in range(args.num)]
    completions = ["\n\n".join(steps) for steps in step_lists]

    # per-step prefixes: the conversation cut after step k's assistant "+", scored at the token predicting it
    prefixes: list[list[int]] = []
    for prompt, steps in zip(prompts, step_lists, strict=True):
        conv = conversation(prompt, steps)
        for k in range(len(steps)):
            text = tok.apply_chat_template(conv[: 2 * k + 2], tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            at = max(t for t in range(2, len(ids)) if ids[t] == plus and ids[t - 2] == header)
            prefixes.append(ids[: at + 1])  # the tokens after "+" do not change the logits before it

    def judge(logits: torch.Tensor) -> float:
        return float(logits[[plus, minus]].float().softmax(-1)[0])

    @torch.no_grad()
    def per_step_loop() -> list[float]:
        out = []
        for ids in prefixes:
            logits = model(torch.tensor([ids], device=device), use_cache=False).logits[0, -2]
            out.append(judge(logits))
        return out

    engine = HFEngine(model, tok.pad_token_id)

    def read_pair(outputs, input_ids, attention_mask):
        return outputs.logits[..., [plus, minus]]

    def per_step_batched() -> list[float]:
        rows = engine.run(prefixes, read_pair)
        return [float(r[len(ids) - 2].softmax(-1)[0]) for r, ids in zip(rows, prefixes, strict=True)]

    prm = PRM(model, tok, kind="next_token", name="prm", device=device)

    def one_pass() -> list[float]:
        return [x for steps in prm.score_steps(prompts, completions) for x in steps]  # type: ignore[union-attr]

    with torch.no_grad():  # warm up every path on a few short inputs
        model(torch.tensor([prefixes[0]], device=device))
    engine.run(prefixes[:4], read_pair)
    prm.score_steps(prompts[:2], completions[:2])
    loop = measure(per_step_loop, device)
    batched = measure(per_step_batched, device)
    ours = measure(one_pass, device)

    full_lengths = [len(prefixes[(i + 1) * args.steps - 1]) for i in range(args.num)]
    print(f"rh_trl {rh_trl.__version__}; device: {device} ({torch.get_num_threads()} threads), float32")
    print(f"causal LM: {args.layers} layers, hidden {args.hidden}, vocab {len(tok)}")
    print(
        f"batch: {args.num} responses x {args.steps} steps; full sequences {min(full_lengths)}-{max(full_lengths)} "
        f"tokens; {sum(len(p) for p in prefixes)} tokens in per-step prefixes vs {sum(full_lengths)} in one pass"
    )
    print(f"{'path':<36}{'seconds':>9}{'forwards':>10}{'peak MB':>10}")
    print(
        f"{'per-step loop (1 pass per step)':<36}{loop.seconds:>9.2f}{len(prefixes):>10}{loop.peak_mb:>10.0f}"
    )
    print(
        f"{'per-step prefixes, HFEngine batched':<36}{batched.seconds:>9.2f}{engine.last_stats.batches:>10}"
        f"{batched.peak_mb:>10.0f}"
    )
    print(
        f"{'rh_trl.PRM one pass per sample':<36}{ours.seconds:>9.2f}{prm.engine.last_stats.batches:>10}{ours.peak_mb:>10.0f}"
    )
    ref = torch.tensor(loop.value)
    print(
        f"max abs step-score difference vs per-step loop: one pass {(torch.tensor(ours.value) - ref).abs().max():.2e}, "
        f"batched prefixes {(torch.tensor(batched.value) - ref).abs().max():.2e}"
    )
    print(f"speed ratio (per-step loop / one pass): {loop.seconds / ours.seconds:.1f}x")
    print(f"speed ratio (batched per-step prefixes / one pass): {batched.seconds / ours.seconds:.1f}x")


if __name__ == "__main__":
    main()
