"""Steps of a response and the aggregation of step scores into one reward (pure Python, no model)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def split_steps(text: str, separator: str = "\n\n") -> list[str]:
    """Split a response into steps: cut at ``separator``, strip each step, drop empty ones.

    A response without the separator is one step; an empty (or whitespace-only) response has no steps.
    """
    if not separator:
        raise ValueError("the step separator must be a non-empty string")
    return [step for step in (part.strip() for part in text.split(separator)) if step]


def _geometric_mean(scores: Sequence[float]) -> float:
    if min(scores) <= 0.0:
        return 0.0
    return math.exp(math.fsum(math.log(s) for s in scores) / len(scores))


#: name → function turning a non-empty list of step scores into one reward
AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "min": min,
    "last": lambda scores: scores[-1],
    "mean": lambda scores: math.fsum(scores) / len(scores),
    "prod": math.prod,
    "geometric_mean": _geometric_mean,
}


def get_aggregation(name: str) -> Callable[[Sequence[float]], float]:
    """The aggregation registered under ``name``, with an error listing the valid names."""
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {name!r}; expected one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[name]
