"""Micro-batch planning, deduplication and the engine's forward passes."""

from __future__ import annotations

import random

import pytest
import torch

from rh_trl.engines import HFEngine
from rh_trl.engines.batching import deduplicate, plan_batches


def test_plan_batches_respects_budget_and_covers_everything():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(200)]
    batches = plan_batches(lengths, max_tokens=1000, max_batch_size=16)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 16
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 1000
    # longest first, and sorting keeps padding low
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert sum(lengths) / padded > 0.9


def _cost(batches, lengths, overhead):
    return sum(len(b) * max(lengths[i] for i in b) + overhead for b in batches)


def _brute_force_cost(sorted_lengths, max_tokens, overhead):
    """Least cost over every way of cutting the sorted lengths into contiguous batches."""
    n = len(sorted_lengths)
    best = float("inf")
    for mask in range(1 << (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        runs = [sorted_lengths[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
        if all(len(r) == 1 or len(r) * r[0] <= max_tokens for r in runs):
            best = min(best, sum(len(r) * r[0] + overhead for r in runs))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_plan_batches_is_optimal(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 40), rng.randint(100, 400)]) for _ in range(9)]
    batches = plan_batches(lengths, max_tokens=600, overhead_tokens=50)
    expected = _brute_force_cost(sorted(lengths, reverse=True), 600, 50)
    assert _cost(batches, lengths, 50) == expected


def test_plan_batches_overlong_sequence_gets_own_batch():
    batches = plan_batches([5000, 10, 10], max_tokens=100)
    assert [5000] in [[[5000, 10, 10][i] for i in b] for b in batches]


def test_plan_batches_rejects_bad_budget():
    with pytest.raises(ValueError):
        plan_batches([1, 2], max_tokens=0)


def test_deduplicate():
    unique, inverse = deduplicate(["a", "b", "a", "c", "b"])
    assert [["a", "b", "a", "c", "b"][i] for i in unique] == ["a", "b", "c"]
    assert inverse == [0, 1, 0, 2, 1]


def test_engine_matches_per_sequence_forward(rm_chatml, chatml_tok):
    rng = random.Random(1)
    seqs = [[rng.randrange(5, len(chatml_tok)) for _ in range(rng.randint(1, 40))] for _ in range(12)]
    seqs.append(list(seqs[3]))  # a duplicate
    engine = HFEngine(rm_chatml, chatml_tok.pad_token_id, max_tokens_per_batch=128)
    rows = engine.run(seqs)
    with torch.no_grad():
        expected = [rm_chatml(torch.tensor([s])).logits[0] for s in seqs]
    assert max((r - e).abs().max().item() for r, e in zip(rows, expected, strict=True)) <= 1e-5
    stats = engine.last_stats
    assert stats.sequences == 13 and stats.unique_sequences == 12
    assert stats.batches > 1 and stats.real_tokens == sum(len(s) for s in seqs[:12])
    assert 0 < stats.padding_efficiency <= 1


def test_engine_rejects_empty_sequence(rm_chatml, chatml_tok):
    engine = HFEngine(rm_chatml, chatml_tok.pad_token_id)
    with pytest.raises(ValueError, match="sequence 1 has no tokens"):
        engine.run([[5, 6], []])
