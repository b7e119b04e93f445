"""rh_trl: reward models of every family as TRL reward functions.

The names below are imported on first use (``rh_trl.ORM`` imports torch and transformers then), so that
``import rh_trl`` and ``rh-trl --help`` stay fast.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name → the module that defines it
_EXPORTS: dict[str, str] = {
    "DrSow": "rh_trl.rewards",
    "EmbeddingRM": "rh_trl.rewards.embedding",
    "EmbeddingHead": "rh_trl.rewards.embedding_heads",
    "EmbeddingCache": "rh_trl.rewards.text_encoder",
    "HeadTraining": "rh_trl.rewards.embedding_heads",
    "TextEncoder": "rh_trl.rewards.text_encoder",
    "train_heads": "rh_trl.rewards.embedding_heads",
    "CLoud": "rh_trl.rewards",
    "CLoudConfig": "rh_trl.rewards",
    "CLoudModel": "rh_trl.rewards",
    "GenRM": "rh_trl.rewards",
    "JudgeTemplate": "rh_trl.rewards",
    "PairwisePM": "rh_trl.rewards",
    "ORM": "rh_trl.rewards",
    "PRM": "rh_trl.rewards",
    "RemoteRM": "rh_trl.rewards",
    "RetryPolicy": "rh_trl.engines.http",
    "ChatFormatter": "rh_trl.formatting",
    "HFEngine": "rh_trl.engines",
    "ModelLoadError": "rh_trl.models.loading",
    "ModelNotServedError": "rh_trl.engines.http",
    "ORMAdapter": "rh_trl.rewards",
    "Reward": "rh_trl.rewards",
    "RewardInputError": "rh_trl.formatting",
    "RewardOutput": "rh_trl.rewards",
    "Sample": "rh_trl.formatting",
    "register_orm_adapter": "rh_trl.rewards",
    "load": "rh_trl.registry",
    "register_model": "rh_trl.registry",
    "resolve": "rh_trl.registry",
    "UnknownModelError": "rh_trl.registry",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a submodule, e.g. rh_trl.rewards after a bare `import rh_trl`
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'rh_trl' has no attribute {name!r}")
        return importlib.import_module(f"{__name__}.{name}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from rh_trl.engines import HFEngine
    from rh_trl.engines.http import ModelNotServedError, RetryPolicy
    from rh_trl.formatting import ChatFormatter, RewardInputError, Sample
    from rh_trl.models.loading import ModelLoadError
    from rh_trl.registry import UnknownModelError, load, register_model, resolve
    from rh_trl.rewards import (
        ORM,
        PRM,
        CLoud,
        CLoudConfig,
        CLoudModel,
        DrSow,
        GenRM,
        JudgeTemplate,
        ORMAdapter,
        PairwisePM,
        RemoteRM,
        Reward,
        RewardOutput,
        register_orm_adapter,
    )
    from rh_trl.rewards.embedding import EmbeddingRM
    from rh_trl.rewards.embedding_heads import EmbeddingHead, HeadTraining, train_heads
    from rh_trl.rewards.text_encoder import EmbeddingCache, TextEncoder
