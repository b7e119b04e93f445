"""Build rewards from plain specs (YAML configs of recipes and of the reward server).

A spec is a mapping with a ``type`` and the keyword arguments of that reward's class::

    {"type": "orm", "model": "Skywork/Skywork-Reward-V2-Llama-3.1-8B", "max_length": 4096, "name": "skywork"}

``weight`` is not passed to the class: recipes read it for the trainer's ``reward_weights``. Model arguments
may be offline names, ``"rh_trl:tiny-rm"`` etc. (see :mod:`rh_trl.models.loading`), so that configs run end to end
without any download.

Register a type with :func:`register_reward_type`. Classes are named as ``"module:Class"`` strings and
imported on first use, so a type whose optional dependencies are missing fails only when it is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from rh_trl.models.loading import OFFLINE_PREFIX
from rh_trl.options import check_options, did_you_mean
from rh_trl.rewards.base import Reward

TINY_PREFIX = OFFLINE_PREFIX  # the name recipes import

#: reward type → "module:attribute" of the class (or factory function) that builds it
REWARD_TYPES: dict[str, str] = {
    "orm": "rh_trl.rewards.orm:ORM",
    "prm": "rh_trl.rewards.prm:PRM",
    "drsow": "rh_trl.rewards.drsow:DrSow",
    "genrm": "rh_trl.rewards.genrm:GenRM",
    "pairwise": "rh_trl.rewards.pairwise:PairwisePM",
    "cloud": "rh_trl.rewards.cloud:CLoud",
    "remote": "rh_trl.rewards.remote:RemoteRM",
    "embedding": "rh_trl.rewards.embedding:load_embedding_rm",
    "auto": "rh_trl.registry:load",  # the class is chosen from the model (rh_trl.load)
}

#: arguments that hold a model (and the tokenizer argument that goes with each)
MODEL_ARGUMENTS = {"model": "tokenizer", "strong": "strong_tokenizer", "weak": "weak_tokenizer"}


def register_reward_type(name: str, target: str | Callable[..., Reward]) -> None:
    """Make ``{"type": name, ...}`` build ``target(**options)`` (a class, a factory, or ``"module:Class"``)."""
    if isinstance(target, str) and ":" not in target:
        raise ValueError(f"target must be 'module:Class', got {target!r}")
    REWARD_TYPES[name] = target  # type: ignore[assignment]


def reward_class(name: str) -> Callable[..., Reward]:
    """The class (or factory) registered for a reward type."""
    if name not in REWARD_TYPES:
        raise ValueError(
            f"unknown reward type '{name}'{did_you_mean(name, REWARD_TYPES)}; known types: {sorted(REWARD_TYPES)}"
        )
    target: Any = REWARD_TYPES[name]
    return target if not isinstance(target, str) else import_target(target, f"reward type '{name}'")


def import_target(target: str, what: str = "the reward") -> Any:
    """The object a ``"package.module:attribute"`` string names, imported on demand."""
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"{what} needs {module_name}, which could not be imported: {err}") from err
    return getattr(module, attribute)


def resolve_tiny(options: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``options`` where an offline model name in a model argument (``model``, ``strong``, ``weak``)
    is what it stands for (:mod:`rh_trl.models.loading`): a tiny model itself, with its tokenizer as the default of the
    matching tokenizer argument, or MiniLM's directory. For deciding a class from the model (:func:`rh_trl.load`);
    the reward classes read the names themselves."""
    from rh_trl.models.loading import is_offline_name, offline_model, offline_path

    options = dict(options)
    for model_arg, tokenizer_arg in MODEL_ARGUMENTS.items():
        if model_arg not in options:
            continue
        value = options[model_arg] = offline_path(options[model_arg])
        if is_offline_name(value):
            model, tokenizer = offline_model(value)
            options[model_arg] = model
            options.setdefault(tokenizer_arg, tokenizer)
    return options


def build_reward(spec: Mapping[str, Any]) -> Reward:
    """Build one reward from a spec (see the module docstring)."""
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(
            f"a reward spec must be a mapping with a 'type' key (one of {sorted(REWARD_TYPES)}), got {spec!r}"
        )
    options = {k: v for k, v in spec.items() if k not in ("type", "weight")}
    cls = reward_class(str(spec["type"]))
    try:
        check_options(cls, options)
    except ValueError as err:
        raise ValueError(f"reward spec {dict(spec)!r}: {err}") from None
    try:
        return cls(**options)
    except TypeError as err:
        raise TypeError(f"reward spec {dict(spec)!r}: {err}") from err


def build_rewards(specs: list[Mapping[str, Any]]) -> tuple[list[Reward], list[float]]:
    """Build several rewards; return them and their weights (``weight``, default 1.0)."""
    if not specs:
        raise ValueError("no rewards given: list at least one reward spec")
    rewards = [build_reward(s) for s in specs]
    return rewards, [float(s.get("weight", 1.0)) for s in specs]
