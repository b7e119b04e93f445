"""Token-budget micro-batching and per-sequence bookkeeping shared by every engine: pure logic, no torch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

logger = logging.getLogger("rh_trl")

V = TypeVar("V")


def plan_batches(
    lengths: Sequence[int],
    max_tokens: int,
    max_batch_size: int | None = None,
    overhead_tokens: int = 1024,
) -> list[list[int]]:
    """Group sequence indices into micro-batches with the least padding, longest batch first.

    Sequences are sorted by length and cut into contiguous runs; a run of ``b`` sequences whose longest has
    ``L`` tokens costs ``b * L`` padded tokens plus ``overhead_tokens`` for the forward pass itself, and must fit
    ``b * L <= max_tokens`` (a sequence longer than the budget runs alone). The cuts minimizing the total cost
    are found exactly by dynamic programming over the sorted lengths, so a long straggler no longer drags a
    batch of much shorter sequences up to its length. The longest batch runs first, so an out-of-memory error
    shows up at once rather than at the end.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_batch must be positive, got {max_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be positive or None, got {max_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    if n == 0:
        return []
    sorted_lengths = np.array([max(1, lengths[i]) for i in order], dtype=np.float64)
    best = np.full(n + 1, np.inf)  # best[j]: least cost of the first j sorted sequences
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)  # cut[j]: where the last batch of that solution starts
    for i in range(n):
        size = max(1, int(max_tokens // sorted_lengths[i]))
        if max_batch_size is not None:
            size = min(size, max_batch_size)
        size = min(size, n - i)
        cost = best[i] + overhead_tokens + sorted_lengths[i] * np.arange(1, size + 1)
        window = best[i + 1 : i + size + 1]
        better = cost < window
        window[better] = cost[better]
        cut[i + 1 : i + size + 1][better] = i
    batches: list[list[int]] = []
    j = n
    while j > 0:
        i = int(cut[j])
        batches.append(order[i:j])
        j = i
    return batches[::-1]


def deduplicate(keys: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """Return ``(unique, inverse)``: indices of first occurrences, and for each key the position of its unique."""
    first: dict[Hashable, int] = {}
    unique: list[int] = []
    inverse: list[int] = []
    for i, key in enumerate(keys):
        if key not in first:
            first[key] = len(unique)
            unique.append(i)
        inverse.append(first[key])
    return unique, inverse


@dataclass
class BatchStats:
    """What one engine call did: sequences in and scored, micro-batches, and tokens real vs. processed."""

    sequences: int = 0
    unique_sequences: int = 0
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0

    @property
    def padding_efficiency(self) -> float:
        """Real tokens over tokens processed (1.0 = no padding)."""
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


#: why a sequence got no value from an engine (``None``: it got one)
Reason = str | None


def split_by_length(sequences: Sequence[Sequence[int]], limit: int | None) -> tuple[list[int], list[int]]:
    """Indices of the sequences of at most ``limit`` tokens, and of the longer ones."""
    if limit is None:
        return list(range(len(sequences))), []
    fits = [i for i, s in enumerate(sequences) if len(s) <= limit]
    return fits, [i for i, s in enumerate(sequences) if len(s) > limit]


def log_too_long(label: str, lengths: Sequence[int], limit: int | None) -> None:
    if lengths:
        logger.warning(
            "%s: %d sequence(s) are longer than the %s tokens the engine takes and get no value (longest: %d); "
            "set max_length to cut prompts from the left instead",
            label,
            len(lengths),
            limit,
            max(lengths),
        )


def reason_counts(reasons: Sequence[str | None], always: Sequence[str] = ()) -> dict[str, int]:
    """How many sequences got no value from an engine, per reason (``too_long``, ``server_failed``,
    ``server_rejected``); the keys in ``always`` are reported even when zero."""
    counts = {key: 0 for key in always}
    for reason in reasons:
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def run_fitting(
    label: str,
    sequences: Sequence[Sequence[int]],
    limit: int | None,
    run: Callable[[list[Sequence[int]]], Sequence[V]],
    run_empty: bool = False,
) -> tuple[list[V | None], list[Reason]]:
    """``run`` on the sequences of at most ``limit`` tokens, in one call, and per sequence its output and
    ``None``; each longer sequence is never run and gets ``None`` and the reason ``"too_long"`` (logged, with
    ``label`` naming the engine). ``run`` is skipped when nothing fits, unless ``run_empty`` (an engine that
    must take part in every call)."""
    fits, too_long = split_by_length(sequences, limit)
    log_too_long(label, [len(sequences[i]) for i in too_long], limit)
    outputs = run([sequences[i] for i in fits]) if fits or run_empty else []
    if len(outputs) != len(fits):
        raise RuntimeError(f"{label} returned {len(outputs)} outputs for {len(fits)} sequences")
    values: list[V | None] = [None] * len(sequences)
    reasons: list[Reason] = ["too_long"] * len(sequences)
    for i, value in zip(fits, outputs, strict=True):
        values[i], reasons[i] = value, None
    return values, reasons
