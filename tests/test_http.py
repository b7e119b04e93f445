"""Retries, failover, rejection and concurrency of the HTTP layer, against mock transports."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

from rh_trl.engines.http import (
    HTTPPool,
    MalformedResponse,
    RequestRejected,
    RetriesExhausted,
    RetryPolicy,
    URLHealth,
    retry_after_seconds,
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


def test_429_is_retried_after_its_retry_after():
    calls = []

    def handler(request):
        calls.append(time.monotonic())
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "1"}, json={"detail": "busy"})
        return httpx.Response(200, json={"ok": 1})

    pool = pool_with(handler)  # backoff alone would wait ~1 ms
    assert run_sync(pool.post("/x", {})) == {"ok": 1}
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.95


def test_retry_after_is_not_waited_for_when_another_url_is_up():
    seen = []

    def handler(request):
        seen.append((request.url.host, time.monotonic()))
        if request.url.host == "busy":
            return httpx.Response(429, headers={"Retry-After": "30"})
        return httpx.Response(200, json=[1])

    pool = pool_with(handler, urls=("http://busy:1", "http://free:2"))
    assert run_sync(pool.post("/x", {})) == [1]
    assert [h for h, _ in seen] == ["busy", "free"] and seen[1][1] - seen[0][1] < 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        ("0.5", 0.5),
        ("-2", 0.0),
        ("soon", None),
        (None, None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_retry_after_header_values(value, expected):
    assert retry_after_seconds(value) == expected


def test_a_failing_url_is_skipped_then_probed_again():
    """Round-robin no longer sends half of all first attempts to a dead (or frozen) replica."""
    state = {"down": True}
    seen = []

    def handler(request):
        seen.append(request.url.host)
        if request.url.host == "bad" and state["down"]:
            raise httpx.ReadTimeout("frozen", request=request)
        return httpx.Response(200, json=[1])

    pool = pool_with(handler, urls=("http://bad:1", "http://good:2"), max_concurrency=1)
    now = [1000.0]
    pool.health.clock = lambda: now[0]
    for _ in range(20):
        assert run_sync(pool.post("/x", {})) == [1]
    assert seen.count("bad") == 1  # (was: 10, one per two requests)
    now[0] += pool.retry.cooldown + 0.01  # the cool-down is over: the URL is probed, still failing
    seen.clear()
    for _ in range(4):
        run_sync(pool.post("/x", {}))
    assert seen.count("bad") == 1
    now[0] += 2 * pool.retry.cooldown + 0.01  # the second cool-down is twice as long; now it is back
    state["down"] = False
    seen.clear()
    for _ in range(6):
        run_sync(pool.post("/x", {}))
    assert seen.count("bad") == 3 and seen.count("good") == 3  # round-robin again


def test_url_health_when_every_url_is_down():
    now = [0.0]
    health = URLHealth(3, cooldown=1.0, max_cooldown=4.0, clock=lambda: now[0])
    for i, seconds in ((0, 3.0), (1, 1.0), (2, 2.0)):
        health.failed(i, retry_after=seconds)
    assert health.pick() == 1  # back first
    for _ in range(5):
        health.failed(0)
    assert health.down_until[0] == 4.0  # doubling, capped at max_cooldown


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_sync_calls_reuse_one_loop_and_client_so_open_files_stay_flat():
    """run_sync (behind RemoteRM.score, GenRM, DrSow's servers, verl's sync hook) used to leave an HTTP client,
    its event loop and its sockets behind on every call."""
    import socketserver
    import threading
    from http.server import BaseHTTPRequestHandler

    class Answer(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"ok": 1}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Answer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pool = HTTPPool(f"http://127.0.0.1:{server.server_address[1]}", retry=FAST)
        run_sync(pool.post("/x", {}))
        before = _open_files()
        for _ in range(300):
            assert run_sync(pool.post("/x", {})) == {"ok": 1}
        assert _open_files() - before <= 4  # (was: +600, two per call)
        assert len(pool._per_loop) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_clients_of_closed_loops_are_dropped():
    pool = pool_with(lambda r: httpx.Response(200, json={}))
    for _ in range(5):
        asyncio.run(pool.post("/x", {}))  # a caller's own short-lived loops
    run_sync(pool.post("/x", {}))
    assert len(pool._per_loop) == 1


def test_run_sync_inside_a_coroutine_on_its_own_loop():
    async def inner():
        return 7

    async def outer():
        return run_sync(inner())  # on the background loop itself: runs on a thread of its own

    assert run_sync(outer()) == 7
