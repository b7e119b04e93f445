"""Dynamic batching with bounded work: many small concurrent requests for one reward become few large scoring
calls, and overload is refused early instead of queued without end.

Each hosted reward has a queue. A collector task takes the oldest request, then keeps taking requests until the
batch holds ``max_items`` samples or ``max_chars`` characters, or ``max_wait_ms`` has passed since the first one;
the samples of all these requests are concatenated into one :class:`~rh_trl.rewards.base.Batch`, scored on the
reward's worker thread (so the event loop keeps answering), and the results are split back to the requests in
order. If a combined call fails, each of its requests is scored on its own, so one failing request never fails
the others.

What bounds the work:

- a token cap per reward (:class:`~rh_trl.serve.sample_cap.TokenCap`): a longer sample gets ``None``, counted
  as ``too_long``, and never reaches a forward pass;
- a bounded queue: a request that would take the samples waiting for this reward past ``max_queue_samples``, or
  past ``max_queue_wait_s`` seconds of work at the recent throughput, is refused with 429 and a ``Retry-After``
  (the time the waiting samples need); a request arriving at an empty queue is always taken;
- cancellation: a request whose caller stopped waiting (the client went away) is dropped before its batch is
  scored (one already being scored is finished, for a retry to pick up);
- a per-batch compute deadline (:mod:`rh_trl.engines.deadline`): a batch still running after
  ``compute_timeout_s`` stops at its next forward pass and its requests get 503;
- the worker is a daemon thread, so stopping never waits for a forward pass to finish: the batch in flight is
  cancelled at its next forward pass and the process can exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rh_trl.engines.deadline import DeadlineExceeded, deadline
from rh_trl.rewards.base import Reward, RewardOutput
from rh_trl.serve.errors import RequestError
from rh_trl.serve.metrics import BatcherMetrics
from rh_trl.serve.sample_cap import TokenCap

logger = logging.getLogger("rh_trl")

T = TypeVar("T")


class DaemonWorker:
    """One daemon thread that runs submitted calls in order. Unlike a ``ThreadPoolExecutor``'s threads, it is
    not joined when the interpreter exits, so a long forward pass never holds up shutdown."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((future, fn, args))
        return future

    def stop(self) -> None:
        """Finish the calls already submitted, then end the thread (without waiting for it)."""
        self._calls.put(None)

    def _loop(self) -> None:
        while (item := self._calls.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # handed to the waiting coroutine
                future.set_exception(err)


@dataclass
class Job:
    """One request's samples, waiting to be scored."""

    prompts: Sequence[Any]
    completions: Sequence[Any]
    columns: dict[str, list[Any]]
    chars: int
    future: asyncio.Future[RewardOutput]
    enqueued: float = field(default_factory=time.perf_counter)
    state: str = "queued"  # -> "batched" (taken by the collector) -> "running"; or "dropped" (caller gone)

    def __len__(self) -> int:
        return len(self.prompts)


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(str(m.get("content", ""))) if isinstance(m, dict) else len(str(m)) for m in value)
    return len(str(value))


class DynamicBatcher:
    """A per-reward queue with a collector task, a worker thread and the limits of the module docstring.

    Args:
        reward: the reward to score with.
        max_items, max_chars: the budget of one combined call.
        max_wait_ms: how long the first request of a batch waits for company.
        enabled: ``False`` scores every request on its own (one call per request).
        max_queue_samples: samples that may wait at once (default: 4 batches' worth).
        max_queue_wait_s: seconds of work (at the recent throughput) that may wait at once.
        max_sample_tokens: the token cap (default: the reward model's context length).
        compute_timeout_s: the deadline of one combined call.
    """

    def __init__(
        self,
        reward: Reward,
        *,
        max_items: int = 256,
        max_chars: int = 1_000_000,
        max_wait_ms: float = 5.0,
        enabled: bool = True,
        max_queue_samples: int | None = None,
        max_queue_wait_s: float = 5.0,
        max_sample_tokens: int | None = None,
        compute_timeout_s: float | None = 120.0,
    ) -> None:
        self.reward = reward
        self.name = reward.__name__
        self.max_items = max_items if enabled else 1
        self.max_chars = max_chars
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled
        self.max_queue_samples = max_queue_samples or 4 * max_items
        self.max_queue_wait_s = max_queue_wait_s
        self.cap = TokenCap(reward, max_sample_tokens)
        self.compute_timeout_s = compute_timeout_s
        self.metrics = BatcherMetrics()
        self.waiting = 0  # samples admitted and not yet taken into a batch (being measured or queued)
        self._rate = 0.0  # samples scored per second of compute, smoothed
        self._queue: asyncio.Queue[Job] | None = None
        self._held: Job | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._cancel = threading.Event()
        self._worker = DaemonWorker(f"rh_trl-{self.name}")
        self._measurer = DaemonWorker(f"rh_trl-{self.name}-measure")

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop: requests still queued get 503, the batch in flight is cancelled at its next forward pass, and
        the worker threads end on their own (nothing here waits for a forward pass)."""
        self._stopping = True
        self._cancel.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        pending = [self._held] if self._held else []
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(RequestError(503, "the server is shutting down", retry_after=5))
        self._worker.stop()
        self._measurer.stop()

    # -- submitting --------------------------------------------------------------------------------------------

    def retry_after(self) -> float:
        """Seconds until the samples waiting now are likely scored (at least 1)."""
        return max(1.0, min(60.0, self.waiting / self._rate)) if self._rate > 0 else 1.0

    def _refusal(self, n: int) -> str | None:
        """Why a request of ``n`` samples cannot wait now, or ``None`` if it can."""
        if not self.waiting:
            return None
        if self.waiting + n > self.max_queue_samples:
            return f"{self.waiting} samples are waiting and the limit is {self.max_queue_samples}"
        seconds = (self.waiting + n) / self._rate if self._rate > 0 else 0.0
        if seconds > self.max_queue_wait_s:
            return (
                f"{self.waiting} samples are waiting, about {seconds:.1f} s of work at "
                f"{self._rate:.0f} samples/s, and the limit is {self.max_queue_wait_s:g} s"
            )
        return None

    async def submit(
        self, prompts: Sequence[Any], completions: Sequence[Any], columns: dict[str, list[Any]] | None = None
    ) -> RewardOutput:
        """Score one request's samples: the too-long ones get ``None`` (``counts["too_long"]``), the rest are
        queued and batched. Raises :class:`RequestError` 429 when the queue is full and 503 when stopping."""
        if self._queue is None:
            raise RuntimeError("the batcher is not running")
        if self._stopping:
            raise RequestError(503, "the server is shutting down", retry_after=5)
        n = len(prompts)
        refusal = self._refusal(n)
        if refusal is not None:
            self.metrics.rejected_overloaded += 1
            seconds = self.retry_after()
            raise RequestError(
                429,
                f"reward '{self.name}' is busy: {refusal}; retry after {seconds:.0f} s",
                retry_after=seconds,
            )
        self.waiting += n
        admitted = n
        try:
            too_long = await self._too_long(prompts, completions)
            self.waiting -= len(too_long)
            admitted -= len(too_long)
            skipped = set(too_long)
            keep = [i for i in range(n) if i not in skipped]
            output = RewardOutput([], {}, {})
            if keep:
                job = Job(
                    [prompts[i] for i in keep],
                    [completions[i] for i in keep],
                    {k: [v[i] for i in keep] for k, v in (columns or {}).items()},
                    sum(_chars(prompts[i]) + _chars(completions[i]) for i in keep),
                    asyncio.get_running_loop().create_future(),
                )
                self.metrics.queue_depth += len(job)
                self._queue.put_nowait(job)
                admitted = 0  # from here the queue accounts for the job's samples
                output = await self._result(job)
            return self._with_too_long(output, n, keep, too_long)
        finally:
            self.waiting -= admitted

    async def _too_long(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[int]:
        maybe = [
            i for i, (p, c) in enumerate(zip(prompts, completions, strict=True)) if self.cap.may_exceed(p, c)
        ]
        if not maybe:
            return []
        found = await asyncio.wrap_future(
            self._measurer.submit(
                self.cap.too_long, [prompts[i] for i in maybe], [completions[i] for i in maybe]
            )
        )
        too_long = [maybe[k] for k in found]
        if too_long:
            self.metrics.count("too_long", len(too_long))
            logger.warning(
                "%s: %d sample(s) longer than %d tokens get no reward (max_sample_tokens)",
                self.name,
                len(too_long),
                self.cap.max_tokens,
            )
        return too_long

    @staticmethod
    def _with_too_long(output: RewardOutput, n: int, keep: list[int], too_long: list[int]) -> RewardOutput:
        if not too_long:
            return output
        rewards: list[float | None] = [None] * n
        extra: dict[str, list[Any]] = {key: [None] * n for key in output.extra}
        for k, i in enumerate(keep):
            rewards[i] = output.rewards[k]
            for key, values in output.extra.items():
                extra[key][i] = values[k]
        counts = dict(output.counts)
        counts["too_long"] = counts.get("too_long", 0) + len(too_long)
        return RewardOutput(rewards, counts, extra)

    async def _result(self, job: Job) -> RewardOutput:
        """Wait for ``job``. Cancelled before its batch runs, the job is dropped; cancelled while its batch runs,
        it is finished anyway, so that a retry of the same call (see :mod:`rh_trl.serve.idempotency`) can
        take the answer instead of scoring the samples again."""
        while True:
            try:
                return await asyncio.shield(job.future)
            except asyncio.CancelledError:
                if job.state == "running":
                    continue
                if job.state == "queued":
                    self.waiting -= len(job)
                    self.metrics.queue_depth -= len(job)
                job.state = "dropped"
                self.metrics.dropped_abandoned += 1
                raise

    # -- collecting and scoring --------------------------------------------------------------------------------

    def _take(self, job: Job) -> Job | None:
        """Account for ``job`` leaving the queue; ``None`` if its caller has gone."""
        if job.state == "dropped":
            return None
        job.state = "batched"
        self.waiting -= len(job)
        self.metrics.queue_depth -= len(job)
        return job

    async def _next(self, timeout: float | None) -> Job | None:
        assert self._queue is not None
        if self._held is not None:
            job, self._held = self._held, None
            return job
        while True:
            if timeout is None:
                job = await self._queue.get()
            elif timeout <= 0:
                if self._queue.empty():
                    return None
                job = self._queue.get_nowait()
            else:
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    return None
            if self._take(job) is not None:
                return job

    async def _collect(self) -> None:
        while True:
            first = await self._next(None)
            assert first is not None
            jobs, items, chars = [first], len(first), first.chars
            deadline_at = time.perf_counter() + self.max_wait
            while self.enabled and items < self.max_items and chars < self.max_chars:
                job = await self._next(deadline_at - time.perf_counter())
                if job is None:
                    break
                fits = items + len(job) <= self.max_items and chars + job.chars <= self.max_chars
                if not fits or set(job.columns) != set(first.columns):
                    self._held = job  # starts the next batch
                    break
                jobs.append(job)
                items += len(job)
                chars += job.chars
            try:
                await self._run(jobs)
            except Exception as err:  # a bug here must not stop the collector: fail this batch, go on
                logger.exception("%s: handling a batch failed", self.name)
                for job in jobs:
                    self._fail(job, err)

    def _score(self, jobs: list[Job]) -> RewardOutput:
        prompts = [p for job in jobs for p in job.prompts]
        completions = [c for job in jobs for c in job.completions]
        columns = {key: [v for job in jobs for v in job.columns[key]] for key in jobs[0].columns}
        with deadline(self.compute_timeout_s, self._cancel, f"scoring a batch of {len(prompts)} samples"):
            batch = self.reward._make_batch(prompts, completions, None, columns)
            return self.reward._compute_checked(batch)

    async def _run(self, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if job.state != "dropped"]  # callers gone: never reach a forward pass
        if not jobs:
            return
        for job in jobs:
            job.state = "running"
        start = time.perf_counter()
        try:
            output = await asyncio.wrap_future(self._worker.submit(self._score, jobs))
        except DeadlineExceeded as err:
            self.metrics.deadline_exceeded += 1
            logger.error("%s: %s; its %d request(s) get 503", self.name, err, len(jobs))
            for job in jobs:
                self._fail(job, RequestError(503, f"scoring failed: {err}", retry_after=self.retry_after()))
            return
        except Exception as err:
            if len(jobs) == 1:
                self._fail(jobs[0], err)
                return
            logger.warning(
                "%s: a combined call of %d requests failed (%s); scoring them one by one",
                self.name,
                len(jobs),
                err,
            )
            for job in jobs:
                await self._run([job])
            return
        seconds = time.perf_counter() - start
        self.metrics.compute_seconds += seconds
        n = sum(len(j) for j in jobs)
        rate = n / max(seconds, 1e-6)
        self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
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
            m.count(key, int(value))
        m.counts["none"] = m.counts.get("none", 0) + sum(r is None for r in output.rewards)
        now = time.perf_counter()
        m.observe_batch(n, (now - j.enqueued for j in jobs))

    def _fail(self, job: Job, err: Exception) -> None:
        self.metrics.failed_requests += 1
        if not isinstance(err, RequestError):
            logger.error("%s: scoring a request of %d samples failed: %r", self.name, len(job), err)
        if not job.future.done():
            job.future.set_exception(err)
