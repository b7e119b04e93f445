"""What rh_trl sends with each verl sample besides prompt and response: its ``data_source`` and ``ground_truth``,
as JSON-friendly dataset columns (shared by verl's custom reward function and the reward manager)."""

from __future__ import annotations

from typing import Any


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a value from verl's non-tensor batch (numpy values become Python ones)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    return value if isinstance(value, str | int | float | bool | list | dict | type(None)) else str(value)


def sample_columns(data_source: Any, ground_truth: Any) -> dict[str, list[Any]]:
    """One sample's ``data_source`` and ``ground_truth`` as the columns sent with it."""
    return {"data_source": [_plain(data_source)], "ground_truth": [_plain(ground_truth)]}
