"""Token-budget micro-batching: pure logic, no torch."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


def plan_batches(lengths: Sequence[int], max_tokens: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Group sequence indices into micro-batches, longest first.

    Each batch's padded size (``len(batch) * longest``) stays within ``max_tokens``; a sequence longer than the
    budget gets a batch of its own. Sorting by length keeps padding low, and putting the longest batch first
    makes an out-of-memory error show up on the first batch rather than the last.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_batch must be positive, got {max_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be positive or None, got {max_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        grown = max(longest, lengths[i])
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or (len(current) + 1) * grown > max_tokens):
            batches.append(current)
            current, grown = [], lengths[i]
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    return batches


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
