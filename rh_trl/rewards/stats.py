"""Summary statistics of one reward call (what ``log_metric`` receives)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def summarize(rewards: Sequence[float | None]) -> dict[str, float]:
    """Mean, population std, min and max of the non-``None`` rewards, and how many were ``None``.

    With no valid reward the moments are NaN (TRL averages NaN-free metrics, so they show up as missing).
    """
    values = [float(r) for r in rewards if r is not None and not math.isnan(r)]
    num_none = len(rewards) - len(values)
    if not values:
        nan = float("nan")
        return {"mean": nan, "std": nan, "min": nan, "max": nan, "num_none": float(num_none)}
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return {
        "mean": mean,
        "std": math.sqrt(var),
        "min": min(values),
        "max": max(values),
        "num_none": float(num_none),
    }
