"""The reward contract: every rh_trl reward is a TRL reward function.

    reward(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]

A :class:`Reward` takes TRL's standard (strings) and conversational (message lists) formats, returns one value per
completion in order (``None`` = no reward for that sample; TRL turns it into NaN and leaves it out), has a stable
``__name__`` under which TRL logs it, ignores keyword arguments it does not use, and reports per-call statistics
through TRL's ``log_metric`` when the trainer passes it. ``reward.score(prompts, completions)`` gives the same
numbers outside any trainer.

A reward is deliberately *not* an ``nn.Module``: TRL routes modules to its own built-in reward-model path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rh_trl.engines.ranks import RankCall, RankExchange
from rh_trl.formatting import RewardInputError, Sample, check_batch, to_sample
from rh_trl.rewards.stats import summarize

logger = logging.getLogger("rh_trl")


def log_encoding(
    name: str, counts: dict[str, int], errors: Sequence[str | None], max_length: int | None
) -> None:
    """Log a batch's samples that could not be rendered (a warning naming the first) and its truncations
    (``counts`` from :func:`~rh_trl.formatting.encoding_counts`)."""
    failed = [e for e in errors if e is not None]
    if failed:
        logger.warning("%s: %d sample(s) could not be rendered (first: %s)", name, len(failed), failed[0])
    if counts.get("truncated") or counts.get("response_truncated"):
        logger.info(
            "%s: %d sample(s) lost prompt tokens from the left and %d lost response tokens (max_length=%s)",
            name,
            counts["truncated"],
            counts["response_truncated"],
            max_length,
        )


_names_lock = threading.Lock()
_names_taken: Counter[str] = Counter()


def unique_name(base: str) -> str:
    """A readable metric name, made unique within the process (``orm_x``, ``orm_x_2``, …).

    TRL merges the metrics of rewards that share a ``__name__``, so every instance gets its own. Names depend only
    on construction order, so they are the same from run to run.
    """
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_") or "reward"
    with _names_lock:
        _names_taken[base] += 1
        n = _names_taken[base]
    return base if n == 1 else f"{base}_{n}"


@dataclass
class RewardOutput:
    """What a reward computes for one call.

    Attributes:
        rewards: one value per sample, ``None`` where there is no reward.
        counts: event counts to log (e.g. ``{"truncated": 3}``), reported as ``<name>/num_<key>``.
        extra: columns for TRL's completions table (one value per sample), passed to ``log_extra``.
    """

    rewards: list[float | None]
    counts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class Batch:
    """A validated call: samples (``None`` where a pair could not be read), raw inputs and dataset columns.

    ``ranks`` is set when the call is a trainer's call on several processes: this batch is then this process's
    share, and rewards that need whole groups exchange the rest through it (:mod:`rh_trl.engines.ranks`).
    """

    samples: list[Sample | None]
    prompts: Sequence[Any]
    completions: Sequence[Any]
    completion_ids: Sequence[Sequence[int]] | None
    columns: dict[str, Any]
    errors: list[str | None]
    ranks: RankCall | None = None

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class _Call:
    """One reward call in progress: the validated batch, when it started, and TRL's logging hooks."""

    batch: Batch
    start: float
    log_metric: Callable[[str, float], None] | None
    log_extra: Callable[[str, list], None] | None


class Reward(ABC):
    """Base class of every rh_trl reward.

    Subclasses implement :meth:`compute`. The base class validates the call, normalizes the two TRL formats
    (a sample that cannot be read becomes ``None`` and is counted, unless ``strict``), times the call, and
    reports statistics.

    Args:
        name: the ``__name__`` TRL logs this reward under (default: derived from the model, made unique).
        strict: raise on a malformed sample instead of giving it ``None``.
        text_as_chat: render standard-format strings as a user turn and an assistant turn.
        log_stats: send per-call statistics to ``log_metric`` when the trainer provides it.
    """

    #: kwargs TRL passes that are not dataset columns
    TRAINER_KWARGS = ("trainer_state", "log_metric", "log_extra", "environments")

    def __init__(
        self,
        *,
        name: str | None = None,
        default_name: str = "reward",
        strict: bool = False,
        text_as_chat: bool = False,
        log_stats: bool = True,
    ) -> None:
        self.__name__ = name if name is not None else unique_name(default_name)
        self.strict = strict
        self.text_as_chat = text_as_chat
        self.log_stats = log_stats
        self.last_stats: dict[str, float] = {}
        self._ranks = RankExchange(self.__name__)

    # -- the TRL entry point ----------------------------------------------------------------------------------

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        ranks = self._ranks.call(kwargs, self.rank_settings())
        with ranks or contextlib.nullcontext():
            call = self._start_call(prompts, completions, completion_ids, kwargs, ranks)
            return self._finish_call(call, self.compute(call.batch))

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        """Score prompt/completion pairs outside a trainer (same numbers as calling the reward)."""
        return self(prompts, completions, **columns)

    async def acall(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """The reward as a coroutine (runs in a worker thread, so the caller's event loop keeps going)."""
        return await asyncio.to_thread(self, prompts, completions, completion_ids, **kwargs)

    def as_async(self) -> AsyncReward:
        """An ``async`` reward function with the same ``__name__``: TRL then computes it concurrently with the
        other rewards of the step (worth it when the numbers come from servers)."""
        return AsyncReward(self)

    # -- what subclasses implement ----------------------------------------------------------------------------

    @abstractmethod
    def compute(self, batch: Batch) -> RewardOutput:
        """Compute one value per sample of ``batch`` (``batch.samples[i] is None`` → reward ``None``)."""

    def rank_settings(self) -> Any:
        """What must be equal on every process of a trainer for its calls to be exchanged (e.g. how completions
        are grouped); a process with other settings is an error. ``None``: nothing beyond the call itself."""
        return None

    # -- internals --------------------------------------------------------------------------------------------

    def _start_call(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None,
        kwargs: dict[str, Any],
        ranks: RankCall | None = None,
    ) -> _Call:
        """Separate TRL's logging hooks and trainer arguments from dataset columns, and validate the batch."""
        log_metric = kwargs.pop("log_metric", None)
        log_extra = kwargs.pop("log_extra", None)
        for key in self.TRAINER_KWARGS:
            kwargs.pop(key, None)
        start = time.perf_counter()
        batch = self._make_batch(prompts, completions, completion_ids, kwargs)
        batch.ranks = ranks
        return _Call(batch, start, log_metric, log_extra)

    def _finish_call(self, call: _Call, output: RewardOutput) -> list[float | None]:
        """Check the computed output, report statistics, and return the rewards."""
        output = self._check_output(output, call.batch)
        seconds = time.perf_counter() - call.start
        self._report(output, call.batch, seconds, call.log_metric, call.log_extra)
        return output.rewards

    def _make_batch(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None,
        columns: dict[str, Any],
    ) -> Batch:
        try:
            check_batch(prompts, completions)
        except RewardInputError as err:
            raise RewardInputError(f"{self.__name__}: {err}") from None
        samples: list[Sample | None] = []
        errors: list[str | None] = []
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            try:
                samples.append(to_sample(p, c, self.text_as_chat))
                errors.append(None)
            except RewardInputError as err:
                if self.strict:
                    raise RewardInputError(f"{self.__name__}: sample {i}: {err}") from None
                samples.append(None)
                errors.append(str(err))
        return Batch(samples, prompts, completions, completion_ids, columns, errors)

    def _compute_checked(self, batch: Batch) -> RewardOutput:
        return self._check_output(self.compute(batch), batch)

    def _check_output(self, output: RewardOutput, batch: Batch) -> RewardOutput:
        """Check a computed output's length; count and log the samples that could not be read."""
        if len(output.rewards) != len(batch):
            raise RuntimeError(
                f"{self.__name__} computed {len(output.rewards)} rewards for {len(batch)} samples (a bug in rh_trl)"
            )
        bad = [i for i, e in enumerate(batch.errors) if e is not None]
        if bad:
            output.counts["invalid"] = output.counts.get("invalid", 0) + len(bad)
            logger.warning(
                "%s: %d sample(s) could not be read and get no reward (first, sample %d: %s)",
                self.__name__,
                len(bad),
                bad[0],
                batch.errors[bad[0]],
            )
        return output

    def _report(
        self,
        output: RewardOutput,
        batch: Batch,
        seconds: float,
        log_metric: Callable[[str, float], None] | None,
        log_extra: Callable[[str, list], None] | None,
    ) -> None:
        rewards, counts = output.rewards, output.counts
        if batch.ranks is not None:  # a trainer's call on several processes: statistics of every completion
            shares = batch.ranks.gather("report", (output.rewards, output.counts, seconds))
            rewards = [r for share in shares for r in share[0]]
            counts = {}
            for _, share_counts, _ in shares:
                for key, n in share_counts.items():
                    counts[key] = counts.get(key, 0) + n
            seconds = max(share[2] for share in shares)
        stats = summarize(rewards)
        stats["seconds"] = seconds
        for key, n in counts.items():
            stats[f"num_{key}"] = float(n)
        self.last_stats = stats
        if log_metric is not None and self.log_stats:
            for key, value in stats.items():
                log_metric(f"{self.__name__}/{key}", value)
        if log_extra is not None:
            for column, values in output.extra.items():
                log_extra(f"{self.__name__}/{column}", values)


class AsyncReward:
    """A :class:`Reward` as an ``async`` TRL reward function (same ``__name__``, same numbers)."""

    def __init__(self, reward: Reward) -> None:
        self.reward = reward
        self.__name__ = reward.__name__

    async def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        return await self.reward.acall(prompts, completions, completion_ids, **kwargs)
