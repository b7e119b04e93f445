"""Keyword options checked against what a class takes, with the closest valid name for a typo."""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def closest(word: str, valid: Iterable[str]) -> str | None:
    """The valid word nearest to ``word`` (a likely typo), or ``None`` when none is close."""
    matches = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, valid: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest valid word, else an empty string."""
    near = closest(word, valid)
    return f" (did you mean {near!r}?)" if near else ""


def keyword_names(target: Callable[..., Any]) -> list[str] | None:
    """The keyword arguments ``target`` takes, or ``None`` when it takes any (``**kwargs``) or cannot tell."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_options(target: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """Raise a ValueError for an option ``target`` does not take, naming the closest one and all it takes."""
    valid = keyword_names(target)
    unknown = [name for name in options if valid is not None and name not in valid]
    if unknown:
        label = getattr(target, "__name__", "the reward")
        raise ValueError(
            f"{label} has no option {unknown[0]!r}{did_you_mean(unknown[0], valid or [])}; "
            f"the options it takes: {', '.join(valid or [])}"
        )


def deprecated(old: str, new: str) -> None:
    """Warn that ``old`` is a deprecated spelling of ``new`` (pointing at the caller's caller)."""
    warnings.warn(f"{old} is deprecated; write {new}", DeprecationWarning, stacklevel=3)
