"""Retries that must not be scored twice: calls shared by requests with the same ``Idempotency-Key``.

A client that timed out and retries sends the same key (``RemoteRM`` does, one key per chunk). If the first
request is still queued or being scored, the retry waits for that same call instead of queueing the samples
again; if it finished within ``ttl_s`` seconds, the retry gets its answer at once. The key is combined with the
route, the reward and a hash of the body, so a reused key with a different body is a different call. A call
that failed is forgotten at once, so a retry runs it again; a call is cancelled only when every request waiting
for it has gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    task: asyncio.Task[T]
    waiters: int = 0
    finished: float | None = None


class SharedCalls(Generic[T]):
    """In-flight and recently finished calls by key (module docstring)."""

    def __init__(self, ttl_s: float = 120.0, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.reused = 0  # requests answered by a call another request started
        self._entries: dict[str, _Entry[T]] = {}
        self._finished: deque[tuple[float, str]] = deque()  # (when, key), oldest first

    @staticmethod
    def key(*parts: str, body: bytes) -> str:
        return "\x00".join(parts) + "\x00" + hashlib.sha256(body).hexdigest()

    def _expire(self) -> None:
        """Forget finished calls older than ``ttl_s``, and the oldest ones beyond ``max_entries``."""
        now = time.monotonic()
        while self._finished and (
            now - self._finished[0][0] > self.ttl_s or len(self._finished) > self.max_entries
        ):
            when, key = self._finished.popleft()
            entry = self._entries.get(key)
            if entry is not None and entry.finished == when:
                del self._entries[key]

    async def run(self, key: str | None, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()``, or join the call already made under ``key``."""
        if key is None:
            return await call()
        self._expire()
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry(asyncio.ensure_future(call()))
            self._entries[key] = entry
            entry.task.add_done_callback(lambda task, key=key: self._done(key, task))
        else:
            self.reused += 1
        entry.waiters += 1
        try:
            return await asyncio.shield(entry.task)
        finally:
            entry.waiters -= 1
            if entry.waiters == 0 and not entry.task.done():
                entry.task.cancel()  # nobody waits for it any more

    def _done(self, key: str, task: asyncio.Task[T]) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.task is not task:
            return
        if task.cancelled() or task.exception() is not None:
            del self._entries[key]  # a retry runs it again
        else:
            entry.finished = time.monotonic()
            self._finished.append((entry.finished, key))
