"""Robust JSON-over-HTTP for the engines that score on servers (vLLM's OpenAI-compatible API, rh_trl's server).

One :class:`HTTPPool` per reward: a pooled ``httpx.AsyncClient`` per event loop, a concurrency limit, several
base URLs used round-robin with failover, timeouts, and retries with exponential backoff and jitter (tenacity)
on connection errors, timeouts, 5xx and 429 answers (a 429's ``Retry-After`` is honoured) — never on other
4xx, which are the caller's mistake and raise :class:`RequestRejected` with the server's message at once. A URL
that failed is skipped for a while (:class:`URLHealth`) and probed again later. When every attempt failed,
:class:`RetriesExhausted` is raised; rewards turn that into ``None`` for the affected samples, counted and
logged, so training goes on. Synchronous callers go through :func:`run_sync`, which runs every coroutine on
one background event loop, so its clients and connections are reused rather than opened per call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

logger = logging.getLogger("rh_trl")

T = TypeVar("T")


class ServerUnavailable(Exception):
    """A retryable failure: connection error, timeout, or a 5xx/429 answer (``retry_after``: the server's
    ``Retry-After`` in seconds, when it sent one)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestRejected(ValueError):
    """The server refused the request (4xx); retrying would not help. ``status_code`` is the HTTP status."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ModelNotServedError(ValueError):
    """The server does not serve the model asked for (HTTP 404): a configuration error, raised at once."""


class RetriesExhausted(RuntimeError):
    """Every attempt on every URL failed with a retryable error."""


class MalformedResponse(ValueError):
    """The server answered 200 with a body that does not follow the expected schema."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` in all (across URLs), backoff from ``initial`` to ``max`` seconds, a
    request ``timeout`` (``connect_timeout`` for opening a connection), a server's ``Retry-After`` honoured up
    to ``max_retry_after`` seconds, and a failed URL skipped for ``cooldown`` seconds (doubling with each
    further failure, up to ``max_cooldown``) before it is probed again."""

    attempts: int = 4
    initial: float = 0.5
    max: float = 8.0
    timeout: float = 120.0
    connect_timeout: float = 10.0
    max_retry_after: float = 30.0
    cooldown: float = 1.0
    max_cooldown: float = 30.0


def _normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(
            f"server URL '{url}' must start with http:// or https:// (e.g. http://127.0.0.1:8000)"
        )
    return url


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (delay-seconds or an HTTP date); ``None`` when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class URLHealth:
    """A short memory of failing URLs, shared by every request of a pool.

    ``pick`` goes round-robin over the URLs that have not failed recently; a URL that failed is skipped until its
    cool-down ends (``cooldown`` seconds, doubling with each consecutive failure up to ``max_cooldown``, or the
    server's ``Retry-After``), then probed again; a success forgets its failures. When every URL is cooling down,
    the one that comes back first is tried.
    """

    def __init__(
        self, n: int, cooldown: float, max_cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.n = n
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.clock = clock
        self.down_until = [0.0] * n
        self.failures = [0] * n
        self._next = 0

    def available(self, exclude: int | None = None) -> list[int]:
        now = self.clock()
        return [i for i in range(self.n) if self.down_until[i] <= now and i != exclude]

    def pick(self, exclude: int | None = None) -> int:
        """The next URL to try (``exclude``: the one that just failed, avoided while another is up)."""
        up = self.available(exclude) or self.available()
        if not up:
            return min(range(self.n), key=lambda i: self.down_until[i])
        start = self._next
        self._next = (self._next + 1) % self.n
        return min(up, key=lambda i: (i - start) % self.n)

    def failed(self, i: int, retry_after: float | None = None) -> None:
        self.failures[i] += 1
        pause = min(self.cooldown * 2 ** (self.failures[i] - 1), self.max_cooldown)
        if retry_after is not None:
            pause = retry_after
        self.down_until[i] = max(self.down_until[i], self.clock() + pause)

    def succeeded(self, i: int) -> None:
        self.failures[i] = 0
        self.down_until[i] = 0.0


class HTTPPool:
    """POST JSON to one of several servers with pooling, a concurrency limit, failover and retries.

    Args:
        urls: one base URL or several (load is spread round-robin over the URLs that have not failed recently;
            a failed attempt moves to the next).
        api_key: sent as ``Authorization: Bearer <key>``.
        max_concurrency: requests in flight at once (per event loop).
        retry: attempts, backoff and per-request timeout.
        transport: an ``httpx`` transport (tests use ``httpx.MockTransport``).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        max_concurrency: int = 32,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("give at least one server URL")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.urls = [_normalize_url(u) for u in urls]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_concurrency = max_concurrency
        self.retry = retry or RetryPolicy()
        self.transport = transport
        self.health = URLHealth(len(self.urls), self.retry.cooldown, self.retry.max_cooldown)
        # an AsyncClient and a semaphore belong to one event loop: TRL's loop, run_sync's background loop, or a
        # caller's own; entries of loops that have been closed are dropped
        self._per_loop: dict[asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, asyncio.Semaphore]] = {}

    def _client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        for closed in [other for other in self._per_loop if other.is_closed()]:
            del self._per_loop[closed]
        if loop not in self._per_loop:
            limits = httpx.Limits(
                max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
            )
            timeout = httpx.Timeout(
                self.retry.timeout, connect=min(self.retry.connect_timeout, self.retry.timeout)
            )
            client = httpx.AsyncClient(
                headers=self.headers, timeout=timeout, limits=limits, transport=self.transport
            )
            self._per_loop[loop] = (client, asyncio.Semaphore(self.max_concurrency))
        return self._per_loop[loop]

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with jitter; a ``Retry-After`` is honoured when no other URL is up."""
        delay = wait_exponential_jitter(initial=self.retry.initial, max=self.retry.max)(state)
        err = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(err, "retry_after", None)
        if retry_after is not None and not self.health.available():
            delay = max(delay, min(retry_after, self.retry.max_retry_after))
        return delay

    async def post(self, path: str, payload: dict[str, Any], headers: Mapping[str, str] | None = None) -> Any:
        """POST ``payload`` to ``<url><path>`` and return the decoded JSON answer (``headers`` are sent with
        every attempt, e.g. an ``Idempotency-Key`` that lets the server recognize a retry)."""
        client, limit = self._client()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts),
            wait=self._wait,
            retry=retry_if_exception_type(ServerUnavailable),
            reraise=True,
        )
        last: int | None = None
        try:
            async with limit:
                async for attempt in retrying:
                    with attempt:
                        # each attempt takes the next URL that has not failed recently, avoiding the last one
                        i = last = self.health.pick(exclude=last)
                        try:
                            answer = await self._post_once(client, self.urls[i] + path, payload, headers)
                        except ServerUnavailable as err:
                            pause = err.retry_after
                            self.health.failed(
                                i, None if pause is None else min(pause, self.retry.max_retry_after)
                            )
                            raise
                        self.health.succeeded(i)
                        return answer
        except ServerUnavailable as err:
            raise RetriesExhausted(f"{path}: {self.retry.attempts} attempts failed; last: {err}") from err
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post_once(
        self,
        client: httpx.AsyncClient,
        url: str,
        payload: dict[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        try:
            response = await client.post(url, json=payload, headers=headers)
        except (httpx.TransportError, httpx.TimeoutException) as err:
            logger.debug("POST %s failed: %r", url, err)
            raise ServerUnavailable(f"{url}: {type(err).__name__}: {err}") from err
        if response.status_code >= 500 or response.status_code == 429:
            raise ServerUnavailable(
                f"{url}: HTTP {response.status_code}: {response.text[:300]}",
                retry_after_seconds(response.headers.get("retry-after")),
            )
        if response.status_code >= 400:
            raise RequestRejected(
                f"{url} rejected the request: HTTP {response.status_code}: {response.text[:500]}",
                status_code=response.status_code,
            )
        try:
            return decode_json(response.content)
        except ValueError as err:
            raise MalformedResponse(
                f"{url} answered with a body that is not JSON: {response.text[:200]!r}"
            ) from err

    async def get(self, path: str) -> Any:
        """GET ``<url><path>`` from the first URL that answers 200 (no retries), e.g. a server's ``/v1/models``."""
        client, _ = self._client()
        failures = []
        for url in self.urls:
            try:
                response = await client.get(url + path)
            except (httpx.TransportError, httpx.TimeoutException) as err:
                failures.append(f"{url}: {type(err).__name__}: {err}")
                continue
            if response.status_code == 200:
                try:
                    return decode_json(response.content)
                except ValueError:
                    failures.append(f"{url}: the answer is not JSON: {response.text[:200]!r}")
            else:
                failures.append(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
        raise ServerUnavailable(f"GET {path} failed on every URL: {'; '.join(failures)}")

    async def served_models(self) -> dict[str, dict[str, Any]]:
        """The models the server lists at ``/v1/models`` (id → its entry, e.g. ``max_model_len``)."""
        answer = await self.get("/v1/models")
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise MalformedResponse(f"/v1/models answered without a 'data' list: {str(answer)[:200]}")
        return {str(m["id"]): m for m in data if isinstance(m, dict) and "id" in m}

    async def model_not_served(
        self, model: str | None, err: RequestRejected, label: str
    ) -> ModelNotServedError:
        """The error for a 404 answer: it names the models the server does serve (when it says)."""
        try:
            served = sorted(await self.served_models())
            listing = f"it serves {served}"
        except (ServerUnavailable, MalformedResponse) as lookup:
            listing = f"and /v1/models could not be read ({lookup})"
        return ModelNotServedError(
            f"{label} at {self.urls}: the server does not serve the model {model!r}; {listing}. "
            f"Pass the served model's name (vllm serve --served-model-name sets it). Server said: {err}"
        )

    async def aclose(self) -> None:
        """Close the client of the running event loop."""
        loop = asyncio.get_running_loop()
        if loop in self._per_loop:
            client, _ = self._per_loop.pop(loop)
            await client.aclose()


def decode_json(body: bytes) -> Any:
    """Decode a JSON answer with orjson (several times faster on the large per-token log-prob answers); bodies
    orjson refuses, such as the ``NaN`` / ``Infinity`` that Python's encoder writes, go to the standard
    decoder."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


_background_lock = threading.Lock()
_background: tuple[int, asyncio.AbstractEventLoop, threading.Thread] | None = None


def _background_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """The event loop that :func:`run_sync` uses: one per process, on a daemon thread (made anew after a fork)."""
    global _background
    with _background_lock:
        if _background is None or _background[0] != os.getpid() or not _background[2].is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="rh_trl-http-loop", daemon=True)
            thread.start()
            _background = (os.getpid(), loop, thread)
        return _background[1], _background[2]


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code (also when this thread already runs a loop).

    Every call runs on the same background event loop, so the pooled HTTP clients of that loop, and their
    connections, are reused from call to call instead of being opened (and left open) per call.
    """
    loop, thread = _background_loop()
    if threading.current_thread() is thread:  # called from a coroutine on that loop: it cannot wait on itself
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coroutine).result()
    future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()  # e.g. KeyboardInterrupt: do not leave the call running
        raise
