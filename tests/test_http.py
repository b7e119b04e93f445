"""Retries, failover, rejection and concurrency of the HTTP layer, against mock transports."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from rh_trl.engines.http import (
    HTTPPool,
    MalformedResponse,
    RequestRejected,
    RetriesExhausted,
    RetryPolicy,
    run_sync,
)

FAST = RetryPolicy(attempts=3, initial=0.001, max=0.002, timeout=5)


def pool_with(handler, urls=("http://a:1",), **kwargs) -> HTTPPool:
    return HTTPPool(list(urls), retry=FAST, transport=httpx.MockTransport(handler), **kwargs)


def test_retries_5xx_then_succeeds():
    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(503, text="busy") if len(calls) < 3 else httpx.Response(200, json={"ok": 1})

    assert run_sync(pool_with(handler).post("/x", {"a": 1})) == {"ok": 1}
    assert len(calls) == 3


def test_4xx_is_not_retried_and_carries_the_message():
    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(422, json={"detail": "prompts must be a list"})

    with pytest.raises(RequestRejected, match="HTTP 422.*prompts must be a list"):
        run_sync(pool_with(handler).post("/x", {}))
    assert len(calls) == 1


def test_connection_errors_exhaust_retries():
    calls = []

    def handler(request):
        calls.append(request)
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(RetriesExhausted, match="3 attempts failed.*refused"):
        run_sync(pool_with(handler).post("/x", {}))
    assert len(calls) == 3


def test_failover_to_the_next_url_and_bearer_key():
    seen = []

    def handler(request):
        seen.append((request.url.host, request.headers.get("authorization")))
        if request.url.host == "down":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=[1])

    pool = pool_with(handler, urls=("http://down:1", "http://up:2/"), api_key="k")
    assert run_sync(pool.post("/v1/x", {})) == [1]
    assert seen == [("down", "Bearer k"), ("up", "Bearer k")]


def test_malformed_body():
    with pytest.raises(MalformedResponse, match="not JSON"):
        run_sync(pool_with(lambda r: httpx.Response(200, text="<html>")).post("/x", {}))


def test_concurrency_limit():
    active = peak = 0

    async def handler(request):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        return httpx.Response(200, json={})

    pool = pool_with(handler, max_concurrency=3)

    async def many():
        await asyncio.gather(*(pool.post("/x", {}) for _ in range(12)))

    run_sync(many())
    assert peak == 3


def test_bad_urls_are_explained():
    with pytest.raises(ValueError, match="must start with http"):
        HTTPPool("localhost:8000")
    with pytest.raises(ValueError, match="at least one"):
        HTTPPool([])


def test_failover_under_concurrency():
    """Every concurrent request moves on to the other URL when its first attempt hits the dead one."""

    def handler(request):
        if request.url.host == "down":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"ok": True})

    pool = pool_with(handler, urls=("http://down:1", "http://up:2"), max_concurrency=8)
    pool.retry = RetryPolicy(attempts=2, initial=0.001, max=0.002, timeout=5)

    async def many():
        return await asyncio.gather(*(pool.post("/x", {}) for _ in range(16)))

    assert run_sync(many()) == [{"ok": True}] * 16
