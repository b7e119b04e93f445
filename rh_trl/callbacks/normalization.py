"""Running whitening and clipping of each reward before TRL's weighted sum.

Rewards on different scales (an RM's logits next to a 0/1 format check) make ``reward_weights`` hard to
choose. :class:`RewardNormalizer` wraps each reward so that it returns ``clip((r - mean) / std, ±clip)``,
where ``mean`` and ``std`` are running statistics (Welford's algorithm in float64) of every value that reward
has produced so far, this call included. ``None`` stays ``None``. The statistics are a training state:
they are written into each checkpoint folder (``reward_normalizer.json``) and read back when training resumes
from a checkpoint, so a resumed run normalizes exactly as an uninterrupted one.

    normalizer = RewardNormalizer([orm, brevity], clip=5.0)
    trainer = GRPOTrainer(..., reward_funcs=normalizer.rewards, callbacks=[normalizer])

In a trainer on several processes every process adds the whole call's values, all processes' shares in rank
order (:mod:`rh_trl.engines.ranks`), so every process holds the same running state, that of one process scoring
the whole call; a call outside a trainer (``reward.score(...)``) adds only its own values.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from rh_trl.callbacks._wrapping import call_reward, check_wrappable, reward_name
from rh_trl.engines.ranks import RankExchange

logger = logging.getLogger("rh_trl")

STATE_FILE = "reward_normalizer.json"


@dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations (``m2``) of a stream, in float64 (Welford / Chan)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def std(self) -> float:
        """Population standard deviation of everything seen (0 before two values)."""
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 0.0

    def merge(self, count: int, mean: float, m2: float) -> None:
        """Add a batch summarized by its own count, mean and m2 (Chan et al.'s parallel update)."""
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    def update(self, values: Sequence[float]) -> None:
        """Add values one by one (Welford)."""
        for x in values:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)


def batch_moments(values: Sequence[float]) -> tuple[int, float, float]:
    """Count, mean and m2 of one batch, computed in two passes (float64)."""
    if not values:
        return 0, 0.0, 0.0
    mean = math.fsum(values) / len(values)
    return len(values), mean, math.fsum((v - mean) ** 2 for v in values)


class NormalizedReward:
    """``reward``'s values whitened by running statistics and clipped; ``None`` passes through.

    Args:
        reward: any TRL reward function.
        clip: bound on the normalized value's magnitude (``None``: no clipping).
        eps: a running std at or below this is treated as 1 (values are then only centered).
        update: add each call's values to the statistics (``False`` freezes them, e.g. for evaluation).
    """

    _wraps_reward = True

    def __init__(
        self, reward: Callable[..., Any], clip: float | None = 5.0, eps: float = 1e-8, update: bool = True
    ) -> None:
        check_wrappable(reward, "NormalizedReward")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be positive or None, got {clip}")
        self.reward = reward
        self.clip = clip
        self.eps = eps
        self.update = update
        self.moments = RunningMoments()
        self.__name__ = reward_name(reward)
        self._ranks = RankExchange(self.__name__, scope="reward_norm")

    def __getattr__(self, name: str) -> Any:
        if name == "reward":
            raise AttributeError(name)
        return getattr(self.reward, name)

    def normalize(self, value: float) -> float:
        std = self.moments.std
        z = (value - self.moments.mean) / (std if std > self.eps else 1.0)
        return max(-self.clip, min(self.clip, z)) if self.clip is not None else z

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        ranks = self._ranks.call(kwargs, (self.clip, self.eps, self.update))
        with ranks or contextlib.nullcontext():  # a failure here is raised on every process
            values = call_reward(self.reward, prompts, completions, completion_ids, kwargs)
            valid = [float(v) for v in values if v is not None and not math.isnan(v)]
            if ranks is not None:  # the whole call's values, as one process would see them
                valid = [v for share in ranks.gather("values", valid) for v in share]
        if self.update:
            self.moments.merge(*batch_moments(valid))
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric(f"reward_norm/{self.__name__}/running_mean", self.moments.mean)
            log_metric(f"reward_norm/{self.__name__}/running_std", self.moments.std)
        return [None if v is None or math.isnan(v) else self.normalize(float(v)) for v in values]


class RewardNormalizer(TrainerCallback):
    """Normalized versions of ``rewards`` (``.rewards``, for ``reward_funcs``) whose state follows checkpoints.

    ``on_save`` writes every reward's running statistics to ``reward_normalizer.json`` in the checkpoint
    folder; ``on_train_begin`` of a run resumed from a checkpoint reads them back (``resume_from`` names the
    checkpoint folder explicitly; by default it is ``<output_dir>/checkpoint-<global_step>``).
    """

    def __init__(
        self,
        rewards: Iterable[Callable[..., Any]],
        clip: float | None = 5.0,
        eps: float = 1e-8,
        resume_from: str | os.PathLike | None = None,
    ) -> None:
        self.rewards = [NormalizedReward(r, clip=clip, eps=eps) for r in rewards]
        names = [r.__name__ for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards need distinct __name__s to keep their statistics apart, got {names}")
        self.resume_from = resume_from

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {r.__name__: asdict(r.moments) for r in self.rewards}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        missing = [r.__name__ for r in self.rewards if r.__name__ not in state]
        if missing:
            raise ValueError(f"normalizer state has no entry for {missing}; it holds {sorted(state)}")
        for r in self.rewards:
            s = state[r.__name__]
            r.moments = RunningMoments(int(s["count"]), float(s["mean"]), float(s["m2"]))

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state_dict(), indent=2))
        os.replace(tmp, path)
        return path

    def load(self, folder: str | os.PathLike) -> None:
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no reward normalizer state at {path}: was the checkpoint written with one?"
            )
        self.load_state_dict(json.loads(path.read_text()))
        logger.info("reward normalizer state restored from %s", path)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.resume_from is not None:
            self.load(self.resume_from)
        elif state.global_step > 0:  # resumed: the trainer has loaded that checkpoint's state
            self.load(Path(args.output_dir) / f"checkpoint-{state.global_step}")
