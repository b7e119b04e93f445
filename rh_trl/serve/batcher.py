"""Dynamic batching: many small concurrent requests for one reward become few large scoring calls.

Each hosted reward has a queue. A collector task takes the oldest request, then keeps taking requests until the
batch holds ``max_items`` samples or ``max_chars`` characters, or ``max_wait_ms`` has passed since the first one;
the samples of all these requests are concatenated into one :class:`~rh_trl.rewards.base.Batch`, scored in a
worker thread (so the event loop keeps answering), and the results are split back to the requests in order.
If a combined call fails, each of its requests is scored on its own, so one failing request never fails the
others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rh_trl.rewards.base import Reward, RewardOutput

logger = logging.getLogger("rh_trl")


@dataclass
class Job:
    """One request's samples, waiting to be scored."""

    prompts: Sequence[Any]
    completions: Sequence[Any]
    columns: dict[str, list[Any]]
    chars: int
    future: asyncio.Future[RewardOutput]
    enqueued: float = field(default_factory=time.perf_counter)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class BatcherMetrics:
    """Counters for ``GET /metrics``."""

    requests: int = 0
    samples: int = 0
    failed_requests: int = 0
    batches: int = 0
    batch_samples_max: int = 0
    batch_requests_max: int = 0
    queue_depth: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    compute_seconds: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

        return {
            "requests": self.requests,
            "samples": self.samples,
            "failed_requests": self.failed_requests,
            "batches": self.batches,
            "mean_batch_samples": self.samples / self.batches if self.batches else None,
            "mean_batch_requests": self.requests / self.batches if self.batches else None,
            "max_batch_samples": self.batch_samples_max,
            "max_batch_requests": self.batch_requests_max,
            "queue_depth": self.queue_depth,
            "compute_seconds": self.compute_seconds,
            "latency_seconds": {"p50": pct(0.5), "p95": pct(0.95), "max": lat[-1] if lat else None},
            "counts": dict(self.counts),
        }


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(str(m.get("content", ""))) if isinstance(m, dict) else len(str(m)) for m in value)
    return len(str(value))


class DynamicBatcher:
    """A per-reward queue with a collector task and one worker thread.

    Args:
        reward: the reward to score with.
        max_items, max_chars: the budget of one combined call.
        max_wait_ms: how long the first request of a batch waits for company.
        enabled: ``False`` scores every request on its own (one call per request).
    """

    def __init__(
        self,
        reward: Reward,
        *,
        max_items: int = 256,
        max_chars: int = 1_000_000,
        max_wait_ms: float = 5.0,
        enabled: bool = True,
    ) -> None:
        self.reward = reward
        self.max_items = max_items if enabled else 1
        self.max_chars = max_chars
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled
        self.metrics = BatcherMetrics()
        self._queue: asyncio.Queue[Job] | None = None
        self._held: Job | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"rh_trl-{reward.__name__}")

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(
            self._collect(), name=f"batcher-{self.reward.__name__}"
        )

    async def stop(self) -> None:
        """Stop collecting (requests still queued are failed) and release the worker thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        pending = [self._held] if self._held else []
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._pool.shutdown(wait=True)

    # -- submitting --------------------------------------------------------------------------------------------

    async def submit(
        self, prompts: Sequence[Any], completions: Sequence[Any], columns: dict[str, list[Any]] | None = None
    ) -> RewardOutput:
        """Queue one request's samples and wait for their :class:`RewardOutput`."""
        if self._queue is None:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        chars = sum(_chars(p) + _chars(c) for p, c in zip(prompts, completions, strict=True))
        job = Job(prompts, completions, dict(columns or {}), chars, loop.create_future())
        self.metrics.queue_depth += len(job)
        self._queue.put_nowait(job)
        return await job.future

    # -- collecting and scoring --------------------------------------------------------------------------------

    async def _next(self, timeout: float | None) -> Job | None:
        assert self._queue is not None
        if self._held is not None:
            job, self._held = self._held, None
            return job
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait() if not self._queue.empty() else None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _collect(self) -> None:
        while True:
            first = await self._next(None)
            assert first is not None
            jobs, items, chars = [first], len(first), first.chars
            deadline = time.perf_counter() + self.max_wait
            while self.enabled and items < self.max_items and chars < self.max_chars:
                job = await self._next(deadline - time.perf_counter())
                if job is None:
                    break
                fits = items + len(job) <= self.max_items and chars + job.chars <= self.max_chars
                if not fits or set(job.columns) != set(first.columns):
                    self._held = job  # starts the next batch
                    break
                jobs.append(job)
                items += len(job)
                chars += job.chars
            self.metrics.queue_depth -= items
            await self._run(jobs)

    def _score(self, jobs: list[Job]) -> RewardOutput:
        prompts = [p for job in jobs for p in job.prompts]
        completions = [c for job in jobs for c in job.completions]
        columns = {key: [v for job in jobs for v in job.columns[key]] for key in jobs[0].columns}
        batch = self.reward._make_batch(prompts, completions, None, columns)
        return self.reward._compute_checked(batch)

    async def _run(self, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            output = await loop.run_in_executor(self._pool, self._score, jobs)
        except Exception as err:
            if len(jobs) == 1:
                self._fail(jobs[0], err)
                return
            logger.warning(
                "%s: a combined call of %d requests failed (%s); scoring them one by one",
                self.reward.__name__,
                len(jobs),
                err,
            )
            for job in jobs:
                await self._run([job])
            return
        self.metrics.compute_seconds += time.perf_counter() - start
        self._record(jobs, output)
        offset = 0
        for job in jobs:
            n = len(job)
            part = RewardOutput(
                output.rewards[offset : offset + n],
                dict(output.counts) if len(jobs) == 1 else {},
                {k: v[offset : offset + n] for k, v in output.extra.items() if len(v) == len(output.rewards)},
            )
            offset += n
            if not job.future.done():
                job.future.set_result(part)

    def _record(self, jobs: list[Job], output: RewardOutput) -> None:
        m = self.metrics
        n = sum(len(j) for j in jobs)
        m.batches += 1
        m.requests += len(jobs)
        m.samples += n
        m.batch_samples_max = max(m.batch_samples_max, n)
        m.batch_requests_max = max(m.batch_requests_max, len(jobs))
        for key, value in output.counts.items():
            m.counts[key] = m.counts.get(key, 0) + int(value)
        m.counts["none"] = m.counts.get("none", 0) + sum(r is None for r in output.rewards)
        now = time.perf_counter()
        m.latencies.extend(now - j.enqueued for j in jobs)

    def _fail(self, job: Job, err: Exception) -> None:
        self.metrics.failed_requests += 1
        logger.error("%s: scoring a request of %d samples failed: %r", self.reward.__name__, len(job), err)
        if not job.future.done():
            job.future.set_exception(err)
