"""rh_trl.engines.ranks's exchange on one machine: two threads as two processes, sharing one torch store.

The real thing (two processes inside TRL trainers and DeepSpeed) runs in tests/distributed (-m distributed); here the
protocol itself: shares in rank order, reads from some processes only, stamps, failures, timeouts, key cleanup.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from rh_trl.engines.ranks import DistributedRewardError, RankCall, RankExchange, current_call, trainer_world


def both(fn, timeout: float = 30.0):
    """Run ``fn(rank)`` for ranks 0 and 1 at once; return their results (an exception is returned, not raised)."""
    results: list = [None, None]

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except Exception as err:  # noqa: BLE001 - the test looks at it
            results[rank] = err

    threads = [threading.Thread(target=target, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "an exchange hung"
    return results


def exchanges(name: str = "orm", store=None):
    """One reward's exchange as each of two processes holds it (in one process the second gets a numbered name,
    as two rewards of one name do: given the first's name back here)."""
    store = store or dist.HashStore()
    first, second = RankExchange(name, store=store), RankExchange(name, store=store)
    second.name = first.name
    return store, [first, second]


def call_of(exchange: RankExchange, rank: int, step: int = 1, settings=None) -> RankCall:
    exchange._calls += 1
    return RankCall(exchange, exchange._calls, rank, 2, (step, settings))


def test_a_local_call_is_not_exchanged():
    assert trainer_world({"trainer_state": SimpleNamespace(global_step=1)}) is None  # no process group here
    assert RankExchange("x").call({"trainer_state": None}) is None
    assert trainer_world({}) is None


def test_shares_come_back_in_rank_order_and_only_from_the_ranks_asked():
    _, (a, b) = exchanges()
    ex = {0: a, 1: b}

    def run(rank):
        call = call_of(ex[rank], rank)
        everyone = call.gather("layout", f"share {rank}")
        some = call.gather("samples", [rank] * (rank + 1), ranks=[1 - rank])
        return everyone, some

    assert both(run) == [(["share 0", "share 1"], [[1, 1]]), (["share 0", "share 1"], [[0]])]


def test_a_failure_on_one_process_is_raised_on_the_other():
    _, (a, b) = exchanges()
    ex = {0: a, 1: b}

    def run(rank):
        call = call_of(ex[rank], rank)
        with call:
            if rank == 1:
                raise ValueError("bad sample")
            return call.gather("report", rank)

    results = both(run)
    assert isinstance(results[1], ValueError)
    assert isinstance(results[0], DistributedRewardError)
    assert "orm: call 1 (step 1): process 1 failed in its part: ValueError: bad sample" in str(results[0])


@pytest.mark.parametrize("field", ["step", "settings"])
def test_processes_at_another_call_or_with_other_settings_are_an_error(field):
    _, (a, b) = exchanges()
    ex = {0: a, 1: b}

    def run(rank):
        step = 1 + rank if field == "step" else 1
        settings = ("group_size", 4 if rank else None) if field == "settings" else None
        with call_of(ex[rank], rank, step, settings) as call:
            return call.gather("layout", rank)

    for result in both(run):
        assert isinstance(result, DistributedRewardError) and "is at another call" in str(result)


def test_a_missing_process_is_an_error_after_the_timeout(monkeypatch):
    monkeypatch.setenv("RH_TRL_RANK_TIMEOUT_S", "1.5")
    _, (a, _) = exchanges()
    start = time.monotonic()
    with pytest.raises(
        DistributedRewardError, match=r"process\(es\) \[1\] did not reach 'report' within 2 s"
    ):
        call_of(a, 0).gather("report", 0)
    assert time.monotonic() - start < 10


def test_a_call_is_current_inside_its_block_and_keys_do_not_pile_up():
    store, (a, b) = exchanges()
    ex = {0: a, 1: b}
    assert current_call() is None

    def run(rank):
        seen = []
        for _ in range(5):
            with call_of(ex[rank], rank) as call:
                seen.append(current_call() is call)
                call.gather("report", rank)
                call.gather(call.phase("forwards"), 1, ranks=[1 - rank])
        return seen

    assert both(run) == [[True] * 5, [True] * 5]
    assert current_call() is None
    # each process deletes its shares of a call once every process has begun the next: two calls' worth remain
    assert store.num_keys() <= 2 * 2 * 2


def test_two_rewards_with_one_name_keep_their_shares_apart():
    first, second = RankExchange("same"), RankExchange("same")
    assert first.name != second.name and first.display == second.display == "same"
