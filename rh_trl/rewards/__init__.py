"""Reward families: each is a TRL reward function (see :mod:`rh_trl.rewards.base`)."""

from rh_trl.rewards.adapters import ORM_ADAPTERS, ORMAdapter, register_orm_adapter
from rh_trl.rewards.base import Batch, Reward, RewardOutput
from rh_trl.rewards.orm import ORM

__all__ = ["ORM", "ORM_ADAPTERS", "ORMAdapter", "Batch", "Reward", "RewardOutput", "register_orm_adapter"]
