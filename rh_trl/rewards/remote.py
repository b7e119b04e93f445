"""A reward scored by an rh_trl reward server (``rh-trl serve``), as an async TRL reward function.

TRL runs reward functions whose ``__call__`` is ``async def`` concurrently on its own event loop, so a
:class:`RemoteRM` overlaps its HTTP calls with the other rewards of the step. ``rm.score(prompts, completions)``
gives the same numbers synchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Sequence
from typing import Any

import httpx

from rh_trl.engines.http import (
    HTTPPool,
    MalformedResponse,
    RequestRejected,
    RetriesExhausted,
    RetryPolicy,
    run_sync,
)
from rh_trl.formatting import RewardInputError
from rh_trl.rewards.base import Batch, Reward, RewardOutput

logger = logging.getLogger("rh_trl")


class RemoteRM(Reward):
    """A reward computed by an rh_trl reward server.

    Samples are normalized here (both TRL formats), sent in chunks of ``chunk_size`` concurrently to
    ``POST /v1/rewards``, and the answers are put back in order. Several URLs spread the chunks round-robin and
    fail over to each other; a URL that failed is skipped for a while. A busy server's 429 is retried after its
    ``Retry-After``; every chunk carries an ``Idempotency-Key``, so a retry of a chunk the server is still
    scoring waits for that work instead of queueing the chunk again. A chunk that still fails after the retries
    (5xx, 429, timeouts, connection errors) gives ``None`` for its samples, counted as ``num_server_failed``
    and logged; samples the server found longer than its token cap are ``None``, counted as
    ``num_server_too_long``; a chunk the server refuses (4xx) gives ``None`` counted as ``num_server_rejected``,
    except a missing or wrong API key (401/403), which raises at once. ``strict=True`` raises on every failure
    instead.

    Args:
        urls: the server's base URL (``http://host:port``) or several.
        model: the reward's name on the server (may be left out when the server hosts one reward).
        api_key: sent as ``Authorization: Bearer <key>``.
        name: metric name (default ``remote_<model>``, made unique).
        columns: dataset columns to forward with each sample (e.g. ``["answer"]``); others are not sent.
        chunk_size: samples per HTTP request.
        max_concurrency: requests in flight at once.
        retry: attempts, backoff and timeout (:class:`~rh_trl.engines.http.RetryPolicy`).
        text_as_chat: render standard-format strings as a user turn and an assistant turn before sending.
        transport: an ``httpx`` transport (for tests).
    """

    PATH = "/v1/rewards"

    def __init__(
        self,
        urls: str | Sequence[str],
        model: str | None = None,
        *,
        api_key: str | None = None,
        name: str | None = None,
        columns: Sequence[str] = (),
        chunk_size: int = 64,
        max_concurrency: int = 8,
        retry: RetryPolicy | None = None,
        text_as_chat: bool = False,
        strict: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        super().__init__(
            name=name, default_name=f"remote_{model or 'rm'}", strict=strict, text_as_chat=text_as_chat
        )
        self.model = model
        self.columns = list(columns)
        self.chunk_size = chunk_size
        self.pool = HTTPPool(
            urls, api_key=api_key, max_concurrency=max_concurrency, retry=retry, transport=transport
        )

    # -- the TRL entry point (async) -----------------------------------------------------------------------------

    async def __call__(  # type: ignore[override]
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        ranks = self._ranks.call(kwargs, self.rank_settings())
        with ranks or contextlib.nullcontext():
            call = self._start_call(prompts, completions, completion_ids, kwargs, ranks)
            output = await self.acompute(call.batch)
            if ranks is None:
                return self._finish_call(call, output)
            # statistics of every process's share: the wait for the others must not hold the event loop, where
            # other async rewards of this step run
            return await asyncio.to_thread(self._finish_call, call, output)

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        """Score prompt/completion pairs synchronously (same numbers as awaiting the reward)."""
        return run_sync(self(prompts, completions, **columns))

    def compute(self, batch: Batch) -> RewardOutput:
        return run_sync(self.acompute(batch))

    # -- scoring ----------------------------------------------------------------------------------------------

    def _payload(self, batch: Batch, indices: list[int]) -> dict[str, Any]:
        samples = [batch.samples[i] for i in indices]
        payload: dict[str, Any] = {
            "prompts": [s.prompt for s in samples if s is not None],
            "completions": [s.response for s in samples if s is not None],
        }
        if self.model is not None:
            payload["model"] = self.model
        for column in self.columns:
            if column not in batch.columns:
                raise RewardInputError(
                    f"{self.__name__}: column '{column}' was asked for (columns=…) but the call has no such "
                    f"column; it has {sorted(batch.columns)}"
                )
            values = batch.columns[column]
            payload[column] = [values[i] for i in indices]
        return payload

    async def _score_chunk(
        self, batch: Batch, indices: list[int]
    ) -> tuple[list[float | None], str | None, int]:
        """Rewards for one chunk, or ``None`` each and the reason it failed (a count key); and how many of its
        samples the server found too long."""
        try:
            # one key per chunk, the same on every retry: the server answers a retry of a chunk it is still
            # scoring (or scored moments ago) from that work instead of queueing the chunk again
            answer = await self.pool.post(
                self.PATH, self._payload(batch, indices), headers={"Idempotency-Key": uuid.uuid4().hex}
            )
            rewards = answer.get("rewards") if isinstance(answer, dict) else None
            if not isinstance(rewards, list) or len(rewards) != len(indices):
                raise MalformedResponse(
                    f"expected {{'rewards': [...]}} with {len(indices)} values, got {str(answer)[:200]}"
                )
            values: list[float | None] = []
            for r in rewards:
                if r is not None and not (isinstance(r, int | float) and not isinstance(r, bool)):
                    raise MalformedResponse(f"reward {r!r} is not a number or null")
                values.append(None if r is None or not math.isfinite(r) else float(r))
            too_long = answer.get("num_too_long", 0)
            return values, None, too_long if isinstance(too_long, int) else 0
        except RequestRejected as err:
            if self.strict or "HTTP 401:" in str(err) or "HTTP 403:" in str(err):
                raise
            return self._failed(indices, "server_rejected", err)
        except (RetriesExhausted, MalformedResponse) as err:
            if self.strict:
                raise
            key = "server_failed" if isinstance(err, RetriesExhausted) else "server_malformed"
            return self._failed(indices, key, err)

    def _failed(self, indices: list[int], key: str, err: Exception) -> tuple[list[float | None], str, int]:
        logger.error("%s: %d sample(s) get no reward (%s): %s", self.__name__, len(indices), key, err)
        return [None] * len(indices), key, 0

    async def acompute(self, batch: Batch) -> RewardOutput:
        """Score a validated batch on the server(s): chunks sent concurrently, results in order."""
        todo = [i for i, s in enumerate(batch.samples) if s is not None]
        chunks = [todo[k : k + self.chunk_size] for k in range(0, len(todo), self.chunk_size)]
        results = await asyncio.gather(*(self._score_chunk(batch, chunk) for chunk in chunks))
        rewards: list[float | None] = [None] * len(batch)
        counts = {"server_failed": 0, "server_rejected": 0, "server_malformed": 0, "server_too_long": 0}
        for chunk, (values, failure, too_long) in zip(chunks, results, strict=True):
            for i, value in zip(chunk, values, strict=True):
                rewards[i] = value
            if failure is not None:
                counts[failure] += len(chunk)
            counts["server_too_long"] += too_long
        return RewardOutput(rewards, counts)
