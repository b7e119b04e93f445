"""Sending token sequences to a model server (``vllm serve``, SGLang, …) in concurrent multi-sequence requests.

Shared by the engines that ask a server for per-sequence values (span log-probs, classifier outputs, token-level
outputs). Tokenization stays ours: requests carry token ids. Each distinct sequence is sent once; sequences are
sorted by length and cut into requests of ``batch_size``, all in flight at once (up to the pool's concurrency).
What can go wrong, per sequence:

* a request that still fails after the retries → ``None``, reason ``"server_failed"``;
* a request the server refuses (4xx) → retried one sequence per request; those still refused → ``None``,
  reason ``"server_rejected"``;
* a sequence longer than the server's ``max_model_len`` (read from ``/v1/models``, minus the tokens the request
  needs beyond the prompt) → ``None``, reason ``"too_long"``, never sent;
* 401/403 (the key) and 404 (the served model's name) are configuration errors and raise at once — the 404 one
  names the models the server does serve.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import httpx

from rh_trl.engines.batching import Reason, log_too_long
from rh_trl.engines.http import (
    HTTPPool,
    MalformedResponse,
    RequestRejected,
    RetriesExhausted,
    RetryPolicy,
)

logger = logging.getLogger("rh_trl")

V = TypeVar("V")


class SequenceBatchClient(Generic[V]):
    """Per-sequence values from a server, one multi-sequence request per chunk (see the module doc).

    Subclasses set ``PATH`` and ``reserved_tokens`` and implement :meth:`payload` and :meth:`parse`.

    Args:
        urls: base URL(s) without ``/v1`` (e.g. ``http://127.0.0.1:8000``); several are replicas of one model.
        model: the served model's name (``None``: the server's only model).
        api_key: sent as ``Authorization: Bearer <key>``.
        batch_size: sequences per request.
        max_concurrency: requests in flight at once.
        retry: attempts, backoff and per-request timeout.
        transport: an ``httpx`` transport (tests).
        label: how this server is named in messages (e.g. ``"strong"``).
    """

    PATH = ""
    #: tokens a request needs beyond the sequence (a completion request generates one)
    reserved_tokens = 0

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        model: str | None = None,
        api_key: str | None = None,
        batch_size: int = 16,
        max_concurrency: int = 8,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        label: str = "server",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.pool = HTTPPool(
            urls, api_key=api_key, max_concurrency=max_concurrency, retry=retry, transport=transport
        )
        self.model = model
        self.batch_size = batch_size
        self.label = label
        self.max_model_len: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pool.urls}, model={self.model!r})"

    # -- what subclasses define --------------------------------------------------------------------------------

    def payload(self, prompts: list[list[int]]) -> dict[str, Any]:
        """The JSON body for one request."""
        raise NotImplementedError

    def parse(self, answer: Any, prompts: list[list[int]]) -> list[V]:
        """One value per prompt of a 200 answer (raise :class:`MalformedResponse` if it breaks the schema)."""
        raise NotImplementedError

    @staticmethod
    def entries(answer: Any, key: str, count: int, where: str) -> list[Any]:
        """The list under ``key`` of a 200 answer: one entry per sequence sent, in the order sent (sorted by
        ``index`` when every entry has one). Raises :class:`MalformedResponse` otherwise."""
        found = answer.get(key) if isinstance(answer, dict) else None
        if not isinstance(found, list) or len(found) != count:
            got = f"{len(found)}" if isinstance(found, list) else f"no '{key}' list ({str(answer)[:200]})"
            raise MalformedResponse(f"{where}: expected {count} {key} (one per sequence sent), got {got}")
        if all(isinstance(e, dict) and isinstance(e.get("index"), int) for e in found):
            found = sorted(found, key=lambda e: e["index"])
        return found

    # -- the server's limits -------------------------------------------------------------------------------------

    async def read_max_sequence_length(self) -> int | None:
        """The longest sequence the server takes (``max_model_len`` from ``/v1/models`` minus what a request
        needs), or ``None`` when the server does not say or cannot be reached now (asked again next time)."""
        if self.max_model_len is None:
            try:
                models = await self.pool.served_models()
            except Exception as err:  # the limit is optional: scoring goes on without it
                logger.debug("%s: could not read /v1/models: %r", self.label, err)
                return None
            entry = models.get(self.model) if self.model is not None else None
            if entry is None and len(models) == 1:
                entry = next(iter(models.values()))
            value = entry.get("max_model_len") if entry else None
            self.max_model_len = int(value) if isinstance(value, int) else None
        return None if self.max_model_len is None else self.max_model_len - self.reserved_tokens

    # -- sending -----------------------------------------------------------------------------------------------

    async def run(self, sequences: Sequence[Sequence[int]]) -> tuple[list[V | None], list[Reason]]:
        """One value per sequence, and per sequence ``None`` or why it got no value."""
        keys = [tuple(int(t) for t in s) for s in sequences]
        limit = await self.read_max_sequence_length()
        unique = sorted(dict.fromkeys(keys), key=len)  # similar lengths share a request
        too_long = [k for k in unique if limit is not None and len(k) > limit]
        log_too_long(f"{self.label} server", [len(k) for k in too_long], limit)
        sendable = [k for k in unique if limit is None or len(k) <= limit]
        chunks = [sendable[i : i + self.batch_size] for i in range(0, len(sendable), self.batch_size)]
        answers = await asyncio.gather(*(self._send([list(k) for k in chunk]) for chunk in chunks))
        by_key: dict[tuple[int, ...], tuple[V | None, Reason]] = {k: (None, "too_long") for k in too_long}
        for chunk, answer in zip(chunks, answers, strict=True):
            by_key.update(zip(chunk, answer, strict=True))
        return [by_key[k][0] for k in keys], [by_key[k][1] for k in keys]

    async def _send(self, prompts: list[list[int]]) -> list[tuple[V | None, Reason]]:
        try:
            answer = await self.pool.post(self.PATH, self.payload(prompts))
        except RetriesExhausted as err:
            logger.warning(
                "%s server %s: %d sequence(s) get no value after the last retry: %s",
                self.label,
                self.pool.urls,
                len(prompts),
                err,
            )
            return [(None, "server_failed")] * len(prompts)
        except RequestRejected as err:
            if err.status_code in (401, 403):
                raise RequestRejected(
                    f"{self.label} server: check its api_key: {err}", err.status_code
                ) from err
            if err.status_code == 404:
                raise await self.pool.model_not_served(self.model, err, f"{self.label} server") from err
            if len(prompts) > 1:  # find the sequences the server refuses; score the others
                parts = await asyncio.gather(*(self._send([p]) for p in prompts))
                return [part[0] for part in parts]
            logger.warning("%s server refused a sequence of %d tokens: %s", self.label, len(prompts[0]), err)
            return [(None, "server_rejected")]
        return [(value, None) for value in self.parse(answer, prompts)]

    async def aclose(self) -> None:
        await self.pool.aclose()
