"""Adapters for outcome reward models whose score does not come from a plain sequence-classification head.

An adapter says which transformers auto class loads the model, which tokens to append to every sequence, and
how to read the score(s) from the forward outputs. It is picked by the architecture name in the model's
``config.json`` (``architectures``), or by name with ``ORM(..., adapter="armorm")``.

Register your own::

    @register_orm_adapter("MyRewardModel")
    def _my_rm() -> ORMAdapter:
        return ORMAdapter(name="my-rm", read=lambda out, ids, mask: out.rewards)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rh_trl.engines.hf import Reader, read_logits


def _no_suffix(model: Any, tokenizer: Any) -> list[int]:
    return []


@dataclass(frozen=True)
class ORMAdapter:
    """How to load and read one kind of outcome reward model.

    Attributes:
        name: short name (``ORM(..., adapter=name)``).
        model_class: name of the transformers auto class that loads it.
        read: ``read(outputs, input_ids, attention_mask) -> Tensor[batch, num_outputs]``.
        suffix: ``suffix(model, tokenizer) -> list[int]``, token ids appended to every sequence.
        trust_remote_code: the model needs its own code from the checkpoint.
        description: one line for the documentation and error messages.
    """

    name: str
    model_class: str = "AutoModelForSequenceClassification"
    read: Reader = read_logits
    suffix: Callable[[Any, Any], list[int]] = field(default=_no_suffix)
    trust_remote_code: bool = False
    description: str = ""


DEFAULT_ADAPTER = ORMAdapter(
    name="sequence-classification",
    description="AutoModelForSequenceClassification: logits at the last token (Skywork-Reward, FsfairX, "
    "models trained by recipes/train_bt.py, …)",
)

#: architecture name (config.json "architectures") → adapter
ORM_ADAPTERS: dict[str, ORMAdapter] = {}
_BY_NAME: dict[str, ORMAdapter] = {DEFAULT_ADAPTER.name: DEFAULT_ADAPTER}


def register_orm_adapter(
    *architectures: str,
) -> Callable[[Callable[[], ORMAdapter]], Callable[[], ORMAdapter]]:
    """Decorator: register the adapter returned by the decorated factory for these architecture names."""

    def decorate(factory: Callable[[], ORMAdapter]) -> Callable[[], ORMAdapter]:
        adapter = factory()
        for arch in architectures:
            ORM_ADAPTERS[arch] = adapter
        _BY_NAME[adapter.name] = adapter
        return factory

    return decorate


def get_orm_adapter(name: str) -> ORMAdapter:
    """The adapter registered under ``name``, with an error listing the known ones."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown ORM adapter '{name}'; known adapters: {sorted(_BY_NAME)}")
    return _BY_NAME[name]


def adapter_for(config: dict[str, Any]) -> ORMAdapter:
    """The adapter for a model config (a raw ``config.json`` dict): by architecture, else the default."""
    for arch in config.get("architectures") or ():
        if arch in ORM_ADAPTERS:
            return ORM_ADAPTERS[arch]
    return DEFAULT_ADAPTER


# ---------------------------------------------------------------------------------------------------------------
# Public reward models with custom code
# ---------------------------------------------------------------------------------------------------------------


def _read_score(outputs: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return outputs.score


def _read_rewards(outputs: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return outputs.rewards


@register_orm_adapter("LlamaForRewardModelWithGating")
def _armorm() -> ORMAdapter:
    return ORMAdapter(
        name="armorm",
        read=_read_score,
        trust_remote_code=True,
        description="RLHFlow ArmoRM: the gated preference score (`outputs.score`); adapter='armorm-objectives' "
        "gives the 19 objective rewards (`outputs.rewards`) to pick from or weight",
    )


@register_orm_adapter()
def _armorm_objectives() -> ORMAdapter:
    return ORMAdapter(
        name="armorm-objectives",
        read=_read_rewards,
        trust_remote_code=True,
        description="RLHFlow ArmoRM's multi-objective rewards (`outputs.rewards`, one column per objective)",
    )


def _reward_token(model: Any, tokenizer: Any) -> list[int]:
    token_id = getattr(model.config, "reward_token_id", None)
    if token_id is None:
        raise ValueError("the InternLM2 reward model's config has no reward_token_id")
    return [int(token_id)]


@register_orm_adapter("InternLM2ForRewardModel")
def _internlm2() -> ORMAdapter:
    return ORMAdapter(
        name="internlm2-reward",
        model_class="AutoModel",
        suffix=_reward_token,
        trust_remote_code=True,
        description="InternLM2-Reward: the conversation plus config.reward_token_id, score read from "
        "`outputs.logits` (what its get_score does, batched)",
    )
