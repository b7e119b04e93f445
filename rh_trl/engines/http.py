"""Robust JSON-over-HTTP for the engines that score on servers (vLLM's OpenAI-compatible API, rh_trl's server).

One :class:`HTTPPool` per reward: a pooled ``httpx.AsyncClient`` per event loop, a concurrency limit, several
base URLs used round-robin with failover, timeouts, and retries with exponential backoff and jitter (tenacity)
on connection errors, timeouts and 5xx answers — never on 4xx, which are the caller's mistake and raise
:class:`RequestRejected` with the server's message at once. When every attempt failed,
:class:`RetriesExhausted` is raised; rewards turn that into ``None`` for the affected samples, counted and
logged, so training goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import weakref
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

logger = logging.getLogger("rh_trl")

T = TypeVar("T")


class ServerUnavailable(Exception):
    """A retryable failure: connection error, timeout, or a 5xx/429 answer."""


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
    """How hard to try: ``attempts`` in all (across URLs), backoff from ``initial`` to ``max`` seconds."""

    attempts: int = 4
    initial: float = 0.5
    max: float = 8.0
    timeout: float = 120.0


def _normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(
            f"server URL '{url}' must start with http:// or https:// (e.g. http://127.0.0.1:8000)"
        )
    return url


class HTTPPool:
    """POST JSON to one of several servers with pooling, a concurrency limit, failover and retries.

    Args:
        urls: one base URL or several (load is spread round-robin; a failed attempt moves to the next).
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
        self._next_url = itertools.cycle(range(len(self.urls)))
        # an AsyncClient and a semaphore belong to one event loop; TRL keeps one loop, score() makes new ones
        self._per_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, asyncio.Semaphore]
        ]
        self._per_loop = weakref.WeakKeyDictionary()

    def _client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if loop not in self._per_loop:
            limits = httpx.Limits(
                max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
            )
            client = httpx.AsyncClient(
                headers=self.headers, timeout=self.retry.timeout, limits=limits, transport=self.transport
            )
            self._per_loop[loop] = (client, asyncio.Semaphore(self.max_concurrency))
        return self._per_loop[loop]

    async def post(self, path: str, payload: dict[str, Any]) -> Any:
        """POST ``payload`` to ``<url><path>`` and return the decoded JSON answer."""
        client, limit = self._client()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts),
            wait=wait_exponential_jitter(initial=self.retry.initial, max=self.retry.max),
            retry=retry_if_exception_type(ServerUnavailable),
            reraise=True,
        )
        # each request starts at the next URL and moves on to the following one at every retry
        first = next(self._next_url)
        try:
            async with limit:
                async for attempt in retrying:
                    with attempt:
                        url = self.urls[(first + attempt.retry_state.attempt_number - 1) % len(self.urls)]
                        return await self._post_once(client, url + path, payload)
        except ServerUnavailable as err:
            raise RetriesExhausted(f"{path}: {self.retry.attempts} attempts failed; last: {err}") from err
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post_once(self, client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> Any:
        try:
            response = await client.post(url, json=payload)
        except (httpx.TransportError, httpx.TimeoutException) as err:
            logger.debug("POST %s failed: %r", url, err)
            raise ServerUnavailable(f"{url}: {type(err).__name__}: {err}") from err
        if response.status_code >= 500 or response.status_code == 429:
            raise ServerUnavailable(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
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


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, also when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # e.g. inside Jupyter: use a thread of our own
        return pool.submit(asyncio.run, coroutine).result()
