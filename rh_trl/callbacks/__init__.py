"""Training glue for TRL trainers: reward offloading, reward statistics, reward normalization."""

from rh_trl.callbacks.normalization import NormalizedReward, RewardNormalizer, RunningMoments
from rh_trl.callbacks.offload import RewardOffloadCallback
from rh_trl.callbacks.statistics import WithStatistics, reward_statistics

__all__ = [
    "NormalizedReward",
    "RewardNormalizer",
    "RewardOffloadCallback",
    "RunningMoments",
    "WithStatistics",
    "reward_statistics",
]
