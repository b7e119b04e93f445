"""Accuracy of any reward on chosen/rejected pairs, per subset and RewardBench-style per section."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

RewardFn = Callable[..., list[float | None]]

#: RewardBench sections and the subsets (as named by :func:`rh_trl.data.preferences.load_pairs` users) in each;
#: a section's score is the example-weighted accuracy of its subsets, the overall score the mean of sections.
SECTIONS: dict[str, tuple[str, ...]] = {
    "chat_hard": (
        "llmbar-natural",
        "llmbar-adversarial-neighbor",
        "llmbar-adversarial-gptinst",
        "llmbar-adversarial-gptout",
        "llmbar-adversarial-manual",
        "mt-bench-hard",
    ),
    "safety": ("hh-rlhf-harmless",),
}


def shorter_reply(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """The "shorter final reply wins" baseline, as a reward function."""
    return [-float(len(c if isinstance(c, str) else c[-1]["content"])) for c in completions]


def score_pairs(
    reward: RewardFn, pairs: Sequence[dict[str, Any]], batch_size: int = 128, progress: bool = True
) -> tuple[list[float | None], list[float | None]]:
    """Scores of the chosen and of the rejected response of every pair."""
    chosen: list[float | None] = []
    rejected: list[float | None] = []
    for start in tqdm(
        range(0, len(pairs), batch_size), desc="scoring pairs", unit="batch", disable=not progress
    ):
        batch = pairs[start : start + batch_size]
        prompts = [p["prompt"] for p in batch]
        scores = reward(prompts + prompts, [p["chosen"] for p in batch] + [p["rejected"] for p in batch])
        chosen += scores[: len(batch)]
        rejected += scores[len(batch) :]
    return chosen, rejected


def accuracy_report(
    pairs: Sequence[dict[str, Any]], chosen: Sequence[float | None], rejected: Sequence[float | None]
) -> dict[str, Any]:
    """Accuracy overall, per subset and per RewardBench section. A tie counts one half; a pair with a ``None``
    score is left out and counted as ``skipped``."""
    per_subset: dict[str, list[float]] = defaultdict(list)
    margins: list[float] = []
    skipped = 0
    for pair, c, r in zip(pairs, chosen, rejected, strict=True):
        if c is None or r is None:
            skipped += 1
            continue
        per_subset[pair.get("subset", "all")].append(1.0 if c > r else 0.5 if c == r else 0.0)
        margins.append(c - r)
    outcomes = [o for values in per_subset.values() for o in values]
    report: dict[str, Any] = {
        "pairs": len(pairs),
        "scored": len(outcomes),
        "skipped": skipped,
        "accuracy": sum(outcomes) / len(outcomes) if outcomes else None,
        "subsets": {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(per_subset.items())},
        "margins": margins,
    }
    sections = {}
    for section, names in SECTIONS.items():
        present = [per_subset[n] for n in names if n in per_subset]
        if present:
            total = sum(len(v) for v in present)
            sections[section] = sum(sum(v) for v in present) / total
    report["sections"] = sections
    report["section_score"] = sum(sections.values()) / len(sections) if sections else None
    return report


def reward_accuracy(
    reward: RewardFn, pairs: Sequence[dict[str, Any]], progress: bool = False
) -> float | None:
    """The share of ``pairs`` whose chosen response ``reward`` scores higher (:func:`accuracy_report`'s
    ``accuracy``: ties count one half, pairs with a ``None`` score are left out; ``None`` when none is left)."""
    return accuracy_report(pairs, *score_pairs(reward, pairs, progress=progress))["accuracy"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` drawing to files (the Agg backend), or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_margins(margins: Sequence[float], path: str, title: str) -> bool:
    """A histogram of chosen − rejected margins; False (and nothing written) when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(margins, bins=40, color="#4c72b0")
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel("reward(chosen) − reward(rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
