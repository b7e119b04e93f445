"""The rows of ``rh-trl annotate``: a row's responses in its prompt's format, their combined score, and what makes a
row unusable (shared by the local command, :mod:`rh_trl.cli.annotate`, and its Ray Data variant,
:mod:`rh_trl.cli.ray_data`)."""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def as_completion(prompt: Any, response: Any) -> Any:
    """A response in the prompt's TRL format (a string under a conversational prompt becomes a message)."""
    if isinstance(prompt, str) or not isinstance(response, str):
        return response
    return [{"role": "assistant", "content": response}]


def response_text(response: Any) -> str:
    return response if isinstance(response, str) else str(response[-1]["content"])


def combined_scores(
    rewards: Sequence[Callable[..., Any]],
    weights: Sequence[float],
    prompts: Sequence[Any],
    completions: Sequence[Any],
) -> list[float | None]:
    """Weighted sum of the rewards per completion; ``None`` where any reward gave ``None``. Async rewards
    (``RemoteRM``) are awaited."""
    from rh_trl.engines.http import run_sync

    per_reward = []
    for reward in rewards:
        values = reward(prompts=list(prompts), completions=list(completions))
        per_reward.append(run_sync(values) if inspect.isawaitable(values) else values)
    scores: list[float | None] = []
    for values in zip(*per_reward, strict=True):
        if any(v is None or math.isnan(v) for v in values):
            scores.append(None)
        else:
            scores.append(math.fsum(w * float(v) for w, v in zip(weights, values, strict=True)))
    return scores


def file_sha256(path: str | os.PathLike) -> str:
    """A SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def row_problem(row: Mapping[str, Any] | None, need_responses: bool = True) -> str | None:
    """Why a row cannot be annotated (no ``prompt``, or no ``responses`` when nothing generates them), or
    ``None``."""
    if row is None:
        return None
    if "prompt" not in row:
        return f"has no 'prompt' (keys: {sorted(row)})"
    if need_responses and not row.get("responses"):
        return "has no 'responses'; give responses or a policy to generate"
    return None
