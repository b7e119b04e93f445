"""Shared plumbing for rewards that wrap another reward (statistics, normalization)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any


def reward_name(reward: Callable[..., Any]) -> str:
    """The name TRL logs a reward under (its ``__name__``, else its class name)."""
    name = getattr(reward, "__name__", None)
    return str(name) if name else type(reward).__name__


def check_wrappable(reward: Any, wrapper: str) -> None:
    """Reject what a synchronous wrapper cannot call: non-callables, ``nn.Module`` s and async rewards."""
    import torch

    if isinstance(reward, torch.nn.Module):
        raise TypeError(
            f"{wrapper} wraps reward functions, not nn.Module reward models; wrap the model in rh_trl.ORM first"
        )
    if not callable(reward):
        raise TypeError(f"{wrapper} expects a reward function (a callable), got {type(reward).__name__}")
    call = reward if inspect.isfunction(reward) or inspect.ismethod(reward) else type(reward).__call__
    if inspect.iscoroutinefunction(call):
        raise TypeError(f"{wrapper} cannot wrap the async reward {reward_name(reward)!r}")


def call_reward(
    reward: Callable[..., Any],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None,
    kwargs: dict[str, Any],
) -> list[float | None]:
    """Call a TRL reward function with TRL's keyword convention and check it returned one value per row."""
    values = reward(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
    values = list(values)
    if len(values) != len(completions):
        raise ValueError(
            f"{reward_name(reward)} returned {len(values)} values for {len(completions)} completions; "
            "expected one per completion"
        )
    return values
