"""Reward families: each is a TRL reward function (see :mod:`rh_trl.rewards.base`).

The names below are imported on first use, so that the light modules of this package (grouping, statistics,
templates) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name → the module that defines it
_EXPORTS: dict[str, str] = {
    "ORM_ADAPTERS": "rh_trl.rewards.adapters",
    "ORMAdapter": "rh_trl.rewards.adapters",
    "register_orm_adapter": "rh_trl.rewards.adapters",
    "Batch": "rh_trl.rewards.base",
    "Reward": "rh_trl.rewards.base",
    "RewardOutput": "rh_trl.rewards.base",
    "CLoud": "rh_trl.rewards.cloud",
    "CLoudConfig": "rh_trl.rewards.cloud",
    "CLoudModel": "rh_trl.rewards.cloud",
    "DrSow": "rh_trl.rewards.drsow",
    "GenRM": "rh_trl.rewards.genrm",
    "JudgeTemplate": "rh_trl.rewards.genrm_templates",
    "ORM": "rh_trl.rewards.orm",
    "PairwisePM": "rh_trl.rewards.pairwise",
    "PRM": "rh_trl.rewards.prm",
    "AGGREGATIONS": "rh_trl.rewards.prm_steps",
    "split_steps": "rh_trl.rewards.prm_steps",
    "RemoteRM": "rh_trl.rewards.remote",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rh_trl.rewards' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and IDEs see
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
