"""The model registry's table: hub ids (exact, or globs such as ``"RLHFlow/Llama3.1-8B-PRM-*"``) mapped to the
reward class that fits them and its options. :func:`rh_trl.load` reads it (:mod:`rh_trl.registry`), and so do the
reward classes that take options from it (a pairwise model's layout). Targets are classes, factories or
``"module:Class"`` strings imported on first use, so this table imports no reward.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelEntry:
    """A registry row: hub ids matching ``pattern`` are loaded with ``target(model, **options)``.

    ``unsupported`` (instead of a target) makes :func:`load` refuse the model with that explanation.
    """

    pattern: str
    target: Callable[..., Any] | str | None
    options: Mapping[str, Any] = field(default_factory=dict)
    unsupported: str | None = None

    @property
    def is_glob(self) -> bool:
        return any(c in self.pattern for c in "*?[")

    def matches_id(self, model_id: str) -> bool:
        return fnmatch.fnmatchcase(model_id.casefold(), self.pattern.casefold())

    def matches_name(self, name: str) -> bool:
        """Whether a directory called ``name`` matches the pattern's last part (``org/<name part>``)."""
        return fnmatch.fnmatchcase(name.casefold(), self.pattern.rsplit("/", 1)[-1].casefold())


_ENTRIES: list[ModelEntry] = []


def register_model(pattern: str, cls: Callable[..., Any] | str | None = None, **options: Any) -> Any:
    """Register the reward class (or factory) that :func:`load` uses for hub ids matching ``pattern``.

    ``pattern`` is a hub id (``"org/name"``) or a glob over hub ids (``"org/my-rm-*"``); exact ids win over
    globs, and a later registration wins over an earlier one (so yours win over the built-in rows). ``cls`` is a
    :class:`~rh_trl.Reward` subclass, a factory ``f(model, **options) -> Reward`` or a ``"module:attribute"``
    string imported on first use; ``options`` are passed to it (the caller's own keyword arguments win)::

        rh_trl.register_model("myorg/math-prm-*", rh_trl.PRM, kind="next_token", aggregation="last")

        @rh_trl.register_model("myorg/judge-rm")
        class MyJudge(rh_trl.Reward): ...

    Without ``cls`` it returns a decorator that registers what it decorates and returns it unchanged.
    """
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"pattern must be a hub id or a glob such as 'org/name-*', got {pattern!r}")
    if isinstance(cls, str) and ":" not in cls:
        raise ValueError(f"a class given as a string must be 'module:Class', got {cls!r}")

    def add(target: Callable[..., Any] | str) -> Callable[..., Any] | str:
        if not (isinstance(target, str) or callable(target)):
            raise TypeError(f"register_model needs a Reward class or factory, got {type(target).__name__}")
        _ENTRIES.append(ModelEntry(pattern.strip(), target, dict(options)))
        return target

    if cls is None:
        return add
    add(cls)
    return cls


def _register_unsupported(pattern: str, reason: str) -> None:
    _ENTRIES.append(ModelEntry(pattern, None, {}, unsupported=reason))


def registered_models() -> list[ModelEntry]:
    """The registry's rows, in registration order (built-in rows first)."""
    return list(_ENTRIES)


def lookup(model_id: str | None = None, directory_name: str | None = None) -> ModelEntry | None:
    """The registry row for a hub id (exact match, then glob), or for a directory name matched against the
    patterns' last part; ``None`` if none. Later registrations win."""
    newest_first = _ENTRIES[::-1]
    for want_glob in (False, True):
        for entry in newest_first:
            if entry.is_glob != want_glob:
                continue
            if model_id and entry.matches_id(model_id):
                return entry
            if not model_id and directory_name and entry.matches_name(directory_name):
                return entry
    return None


# Public checkpoints whose files do not say what they are (causal LMs), or that need a known option.
PRM = "rh_trl.rewards.prm:PRM"
PAIRWISE_PM = "rh_trl.rewards.pairwise:PairwisePM"
register_model("Qwen/Qwen2.5-Math-PRM-*", PRM, kind="separator")
register_model("Qwen/Qwen2.5-Math-7B-PRM800K", PRM, kind="separator")
register_model("RLHFlow/Llama3.1-8B-PRM-*", PRM, kind="next_token")
register_model("peiyi9979/math-shepherd-mistral-7b-prm", PRM, kind="step_tag")
register_model("RLHFlow/pair-preference-model-*", PAIRWISE_PM, layout="rlhflow")  # its card's inference code
_register_unsupported(
    "Nexusflow/Starling-RM-*",
    "its reward head lives in a standalone script (a causal LM plus a value head), with no from_pretrained class "
    "that rh_trl could load",
)
UPSTREAM_CLOUD = (
    "it is saved in the original CLoud repository's format (CLoudRewardModel: a config that names its base model "
    "plus `reward_base_model.*` weights), which rh_trl.CLoud does not read; rh_trl.CLoud loads CLoudModel "
    "checkpoints (recipes/train_cloud.py, or CLoudModel.from_causal_lm(lm).save_pretrained(dir))"
)
_register_unsupported("ankner/*-CLoud-RM", UPSTREAM_CLOUD)


def resolve_target(target: Callable[..., Any] | str) -> Callable[..., Any]:
    """A registered target itself: a ``"module:Class"`` string is imported."""
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def hub_id_from_path(path: str | os.PathLike) -> str | None:
    """The hub id of a hub-cache snapshot directory (``…/models--org--name/snapshots/<rev>``), else ``None``."""
    parts = Path(path).expanduser().resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        org, sep, name = parts[-3][len("models--") :].partition("--")
        return f"{org}/{name}" if sep else org
    return None
