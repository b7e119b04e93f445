"""rh_trl: reward models of every family as TRL reward functions."""

from rh_trl.embedding_heads import EmbeddingHead, HeadTraining, train_heads
from rh_trl.embeddings import EmbeddingCache, TextEncoder
from rh_trl.engines import HFEngine
from rh_trl.engines.http import RetryPolicy
from rh_trl.formatting import ChatFormatter, RewardInputError, Sample
from rh_trl.loading import ModelLoadError
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

__version__ = "0.1.0"

__all__ = [
    "DrSow",
    "EmbeddingRM",
    "EmbeddingHead",
    "EmbeddingCache",
    "HeadTraining",
    "TextEncoder",
    "train_heads",
    "CLoud",
    "CLoudConfig",
    "CLoudModel",
    "GenRM",
    "JudgeTemplate",
    "PairwisePM",
    "ORM",
    "PRM",
    "RemoteRM",
    "RetryPolicy",
    "ChatFormatter",
    "HFEngine",
    "ModelLoadError",
    "ORMAdapter",
    "Reward",
    "RewardInputError",
    "RewardOutput",
    "Sample",
    "register_orm_adapter",
    "load",
    "register_model",
    "resolve",
    "UnknownModelError",
    "__version__",
]
