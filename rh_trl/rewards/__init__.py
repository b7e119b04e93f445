"""Reward families: each is a TRL reward function (see :mod:`rh_trl.rewards.base`)."""

from rh_trl.rewards.adapters import ORM_ADAPTERS, ORMAdapter, register_orm_adapter
from rh_trl.rewards.base import Batch, Reward, RewardOutput
from rh_trl.rewards.cloud import CLoud, CLoudConfig, CLoudModel
from rh_trl.rewards.drsow import DrSow
from rh_trl.rewards.genrm import GenRM
from rh_trl.rewards.genrm_templates import JudgeTemplate
from rh_trl.rewards.orm import ORM
from rh_trl.rewards.pairwise import PairwisePM
from rh_trl.rewards.prm import PRM
from rh_trl.rewards.prm_steps import AGGREGATIONS, split_steps
from rh_trl.rewards.remote import RemoteRM

__all__ = [
    "DrSow",
    "CLoud",
    "CLoudConfig",
    "CLoudModel",
    "GenRM",
    "JudgeTemplate",
    "PairwisePM",
    "AGGREGATIONS",
    "ORM",
    "ORM_ADAPTERS",
    "PRM",
    "RemoteRM",
    "Batch",
    "ORMAdapter",
    "Reward",
    "RewardOutput",
    "register_orm_adapter",
    "split_steps",
]
