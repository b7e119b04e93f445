"""RemoteRM's client logic against scripted servers (httpx.MockTransport): chunking, order, failover, retries,
4xx handling, None counted and logged, async and sync entry points."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from trl.trainer.utils import is_async_callable

from rh_trl.engines.http import RequestRejected, RetryPolicy
from rh_trl.rewards.remote import RemoteRM

FAST = RetryPolicy(attempts=3, initial=0.01, max=0.02, timeout=5)
PROMPTS = [f"p{i}" for i in range(7)]
COMPLETIONS = ["x" * (i + 1) for i in range(7)]  # expected reward: the completion's length


def length_server(log: list | None = None, fail_first: int = 0, status: int = 503):
    state = {"calls": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        state["calls"] += 1
        body = json.loads(request.content)
        if log is not None:
            log.append((request.url.host, body))
        if state["calls"] <= fail_first:
            return httpx.Response(status, text="busy")
        return httpx.Response(200, json={"rewards": [float(len(c)) for c in body["completions"]]})

    return handler, state


def test_is_an_async_trl_reward_and_score_is_sync():
    handler, _ = length_server()
    rm = RemoteRM("http://rm:1", "m", transport=httpx.MockTransport(handler))
    assert is_async_callable(rm)
    assert rm.score(PROMPTS, COMPLETIONS) == [float(len(c)) for c in COMPLETIONS]

    async def inside_a_loop():  # score() from code that already runs an event loop
        return rm.score(PROMPTS[:2], COMPLETIONS[:2]), await rm(PROMPTS[:2], COMPLETIONS[:2])

    assert asyncio.run(inside_a_loop()) == ([1.0, 2.0], [1.0, 2.0])


def test_chunks_are_sent_concurrently_and_reassembled_in_order():
    log: list = []
    handler, _ = length_server(log)
    rm = RemoteRM("http://rm:1", "m", chunk_size=2, transport=httpx.MockTransport(handler))
    metrics: dict[str, float] = {}
    out = asyncio.run(
        rm(PROMPTS, COMPLETIONS, log_metric=metrics.__setitem__, trainer_state=None, topic=[0] * 7)
    )
    assert out == [float(len(c)) for c in COMPLETIONS]
    assert sorted(len(body["completions"]) for _, body in log) == [1, 2, 2, 2]
    assert all(body["model"] == "m" and "topic" not in body for _, body in log)
    name = rm.__name__
    assert metrics[f"{name}/num_none"] == 0 and metrics[f"{name}/num_server_failed"] == 0
    assert metrics[f"{name}/mean"] == pytest.approx(4.0)


def test_forwarded_columns_and_conversational_samples():
    log: list = []
    handler, _ = length_server(log)
    rm = RemoteRM("http://rm:1", columns=["answer"], transport=httpx.MockTransport(handler))
    prompts = [[{"role": "user", "content": "hi"}]] * 2
    completions = [[{"role": "assistant", "content": "abc"}], "de"]
    rm.score(prompts, completions, answer=["1", "2"])
    body = log[0][1]
    assert body["answer"] == ["1", "2"] and "model" not in body
    assert body["completions"][1] == [{"role": "assistant", "content": "de"}]
    with pytest.raises(ValueError, match="column 'answer' was asked for"):
        rm.score(prompts, completions)


def test_failover_to_the_next_url():
    log: list = []
    good, _ = length_server(log)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down":
            raise httpx.ConnectError("refused", request=request)
        return good(request)

    # one request in flight at a time: each request's retry moves to the other URL
    rm = RemoteRM(
        ["http://down:1", "http://up:1"],
        chunk_size=1,
        max_concurrency=1,
        retry=FAST,
        transport=httpx.MockTransport(handler),
    )
    assert rm.score(PROMPTS, COMPLETIONS) == [float(len(c)) for c in COMPLETIONS]
    assert rm.last_stats["num_server_failed"] == 0


def test_5xx_is_retried():
    handler, state = length_server(fail_first=2, status=503)
    rm = RemoteRM("http://rm:1", retry=FAST, transport=httpx.MockTransport(handler))
    assert rm.score(PROMPTS[:2], COMPLETIONS[:2]) == [1.0, 2.0]
    assert state["calls"] == 3


def test_exhausted_retries_give_none_counted_and_logged(caplog):
    handler, state = length_server(fail_first=10**6, status=500)
    rm = RemoteRM("http://rm:1", chunk_size=3, retry=FAST, transport=httpx.MockTransport(handler))
    metrics: dict[str, float] = {}
    with caplog.at_level(logging.ERROR, logger="rh_trl"):
        out = asyncio.run(rm(PROMPTS, COMPLETIONS, log_metric=metrics.__setitem__))
    assert out == [None] * 7  # never a silent 0
    assert state["calls"] == 3 * FAST.attempts
    assert metrics[f"{rm.__name__}/num_server_failed"] == 7 and metrics[f"{rm.__name__}/num_none"] == 7
    assert "server_failed" in caplog.text


def test_4xx_is_not_retried_and_gives_none_but_a_bad_key_raises():
    handler, state = length_server(fail_first=10**6, status=422)
    rm = RemoteRM("http://rm:1", retry=FAST, transport=httpx.MockTransport(handler))
    assert rm.score(PROMPTS[:3], COMPLETIONS[:3]) == [None] * 3
    assert state["calls"] == 1 and rm.last_stats["num_server_rejected"] == 3
    with pytest.raises(RequestRejected):
        RemoteRM("http://rm:1", retry=FAST, strict=True, transport=httpx.MockTransport(handler)).score(
            ["a"], ["b"]
        )
    handler401, _ = length_server(fail_first=10**6, status=401)
    with pytest.raises(RequestRejected, match="401"):
        RemoteRM("http://rm:1", retry=FAST, transport=httpx.MockTransport(handler401)).score(["a"], ["b"])


def test_malformed_answers_give_none():
    def handler(request: httpx.Request) -> httpx.Response:
        n = len(json.loads(request.content)["completions"])
        return httpx.Response(200, json={"rewards": [1.0] * (n + 1)})

    rm = RemoteRM("http://rm:1", transport=httpx.MockTransport(handler))
    assert rm.score(["a", "b"], ["c", "d"]) == [None, None]
    assert rm.last_stats["num_server_malformed"] == 2


def test_unreadable_sample_is_none_and_not_sent():
    log: list = []
    handler, _ = length_server(log)
    rm = RemoteRM("http://rm:1", transport=httpx.MockTransport(handler))
    assert rm.score(["a", "b"], ["cc", None]) == [2.0, None]
    assert log[0][1]["completions"] == ["cc"] and rm.last_stats["num_invalid"] == 1
