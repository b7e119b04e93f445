"""Reward statistics beyond mean/std: quantiles, None rate, within-group spread, length correlation.

:class:`WithStatistics` wraps a reward (keeping its ``__name__``, so TRL's ``rewards/<name>/mean`` is
unchanged) and reports, for every call, through TRL's ``log_metric`` (GRPO, RLOO)::

    reward_stats/<name>/mean, std, min, max, p10, p50, p90   (over non-None values; std is the population std)
    reward_stats/<name>/frac_none                            (share of completions with no reward)
    reward_stats/<name>/frac_zero_spread_groups              (share of prompts whose completions all got
                                                              the same reward: no GRPO/online DPO signal)
    reward_stats/<name>/length_corr                          (Pearson correlation of reward with completion
                                                              length: a reward-hacking signal)

Length is the number of completion tokens when the trainer passes ``completion_ids``, else characters.
A group is the completions of one prompt wherever they sit in the call (:func:`~rh_trl.rewards.grouping.prompt_groups`:
GRPO's ``[p1, p1, p2, p2]`` and online DPO's ``[p1, p2, p1, p2]`` alike); ``group_size`` switches to consecutive
runs of that many completions, and a call that does not hold whole runs of one prompt each reports NaN for the
group metric, with a warning. A group needs at least two rewards to count. Undefined (NaN) statistics are not
logged. Trainers that pass no ``log_metric`` (online DPO) leave the numbers in ``last_stats``.

In a trainer on several processes the statistics describe the whole call: every process's rewards, lengths and
prompt fingerprints are exchanged (:mod:`rh_trl.engines.ranks`), so min, max, percentiles and groups are those of all
completions, and every process logs the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rh_trl.callbacks._wrapping import call_reward, check_wrappable, reward_name
from rh_trl.engines.ranks import RankExchange
from rh_trl.formatting import RewardInputError
from rh_trl.rewards.grouping import groups_of_keys, prompt_digest

logger = logging.getLogger("rh_trl")

PREFIX = "reward_stats"
NAN = float("nan")


def completion_lengths(
    completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None
) -> list[float]:
    """Tokens per completion when ids are given, else characters of its text (all messages' contents)."""
    if completion_ids is not None:
        return [float(len(ids)) for ids in completion_ids]
    lengths = []
    for c in completions:
        if isinstance(c, str):
            lengths.append(float(len(c)))
        else:
            lengths.append(float(sum(len(str(m.get("content", ""))) for m in c)))
    return lengths


def reward_statistics(
    rewards: Sequence[float | None], lengths: Sequence[float], groups: Sequence[Sequence[int]] | None
) -> dict[str, float]:
    """The statistics of one call (see the module docstring); NaN where a statistic is undefined. ``groups``
    holds the indices of each prompt's completions (``None``: the group metric is undefined)."""
    valid = [(float(r), length) for r, length in zip(rewards, lengths, strict=True) if _valid(r)]
    stats: dict[str, float] = {"frac_none": (len(rewards) - len(valid)) / len(rewards) if rewards else NAN}
    values = np.array([v for v, _ in valid], dtype=np.float64)
    if values.size:
        p10, p50, p90 = np.quantile(values, [0.1, 0.5, 0.9])
        stats.update(mean=values.mean(), std=values.std(), min=values.min(), max=values.max())
        stats.update(p10=p10, p50=p50, p90=p90)
    else:
        stats.update({k: NAN for k in ("mean", "std", "min", "max", "p10", "p50", "p90")})
    stats["length_corr"] = _pearson(values, np.array([n for _, n in valid], dtype=np.float64))
    stats["frac_zero_spread_groups"] = _zero_spread(rewards, groups)
    return {k: float(v) for k, v in stats.items()}


def _digest(prompt: Any) -> bytes | None:
    return None if prompt is None else prompt_digest(prompt)


def _valid(r: float | None) -> bool:
    return r is not None and not math.isnan(r)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2:
        return NAN
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else NAN


def _zero_spread(
    rewards: Sequence[float | None], groups: Sequence[Sequence[int]] | None, atol: float = 1e-9
) -> float:
    if groups is None:
        return NAN
    flat = counted = 0
    for members in groups:
        group = [float(rewards[i]) for i in members if _valid(rewards[i])]  # type: ignore[arg-type]
        if len(group) < 2:
            continue
        counted += 1
        flat += max(group) - min(group) <= atol
    return flat / counted if counted else NAN


class WithStatistics:
    """A reward that returns ``reward``'s values unchanged and logs their statistics (module docstring).

    Args:
        reward: any TRL reward function (an rh_trl reward or a plain function).
        group_size: by default a group is the completions of one prompt wherever they sit; ``group_size``
            (GRPO's ``num_generations``) uses consecutive runs of that many completions instead.
        prefix: metric prefix (``reward_stats`` → ``reward_stats/<name>/p50`` …).
    """

    _wraps_reward = True

    def __init__(
        self, reward: Callable[..., Any], group_size: int | None = None, prefix: str = PREFIX
    ) -> None:
        check_wrappable(reward, "WithStatistics")
        self.reward = reward
        self.group_size = group_size
        self.prefix = prefix
        self.__name__ = reward_name(reward)
        self.last_stats: dict[str, float] = {}
        self._warned = False
        self._ranks = RankExchange(self.__name__, scope=prefix)
        if group_size is not None and group_size < 2:
            raise ValueError(f"group_size must be at least 2 (GRPO's num_generations), got {group_size}")

    def _groups(self, keys: Sequence[bytes | None]) -> list[list[int]] | None:
        try:
            return groups_of_keys(keys, self.group_size)
        except RewardInputError as err:  # a statistic never stops training: NaN, and say why
            if not self._warned:
                logger.warning("%s: frac_zero_spread_groups is not reported: %s", self.__name__, err)
                self._warned = True
            return None

    def __getattr__(self, name: str) -> Any:  # .model, .engine, .score … of the wrapped reward
        if name == "reward":
            raise AttributeError(name)
        return getattr(self.reward, name)

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        ranks = self._ranks.call(kwargs, self.group_size)
        with ranks or contextlib.nullcontext():  # a failure here is raised on every process
            values = call_reward(self.reward, prompts, completions, completion_ids, kwargs)
            share = (values, completion_lengths(completions, completion_ids), [_digest(p) for p in prompts])
            shares = [share] if ranks is None else ranks.gather("values", share)  # the whole call, rank order
        everything = [[x for part in shares for x in part[k]] for k in range(3)]
        self.last_stats = reward_statistics(everything[0], everything[1], self._groups(everything[2]))
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            for key, value in self.last_stats.items():
                if not math.isnan(value):  # undefined for this call (e.g. one value): not logged
                    log_metric(f"{self.prefix}/{self.__name__}/{key}", value)
        return values
