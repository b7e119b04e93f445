"""What ``rh-trl score`` does to rows: check them, score them in batches and write them back with a reward column
(shared by the local command, :mod:`rh_trl.cli.score`, and its Ray Data variant, :mod:`rh_trl.cli.ray_data`)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rh_trl.rewards.stats import summarize

logger = logging.getLogger("rh_trl")

OUTPUT_SUFFIXES = (".jsonl", ".parquet")


def reserved_columns() -> tuple[str, ...]:
    """Names a dataset column cannot take: they are the reward call's own arguments."""
    from rh_trl.rewards.base import Reward

    return ("prompts", "completions", "completion_ids", *Reward.TRAINER_KWARGS)


@dataclass
class ScoreSummary:
    """What one ``rh-trl score`` run wrote."""

    output: str
    rows: int
    num_none: int
    mean: float
    std: float
    min: float
    max: float
    reward: str
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(
        cls, output: str, rewards: Sequence[float | None], reward: str, counts: dict[str, int]
    ) -> ScoreSummary:
        """The summary of ``rewards`` written to ``output`` by ``reward`` (its name and class)."""
        stats = summarize(rewards)
        return cls(
            output=output,
            rows=len(rewards),
            num_none=int(stats["num_none"]),
            mean=stats["mean"],
            std=stats["std"],
            min=stats["min"],
            max=stats["max"],
            reward=reward,
            counts=counts,
        )

    def report(self) -> str:
        lines = [f"scored {self.rows} rows with {self.reward} -> {self.output}"]
        if self.rows - self.num_none:
            lines.append(
                f"  mean {self.mean:.6g}  std {self.std:.6g}  min {self.min:.6g}  max {self.max:.6g}"
            )
        lines.append(f"  no reward (null): {self.num_none}")
        nonzero = {k: v for k, v in sorted(self.counts.items()) if v}
        if nonzero:
            lines.append("  " + "  ".join(f"{k} {v}" for k, v in nonzero.items()))
        return "\n".join(lines)


# -- rows -----------------------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A row value as plain Python (Parquet gives numpy arrays and scalars; NaN becomes ``None``)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):  # numpy arrays and scalars
        return plain(value.tolist())
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def default_output(data: str | os.PathLike) -> Path:
    """``rows.jsonl`` → ``rows.scored.jsonl`` (Parquet input → ``rows.scored.parquet``)."""
    path = Path(data)
    suffix = path.suffix if path.suffix in OUTPUT_SUFFIXES else ".jsonl"
    return path.with_name(f"{path.stem}.scored{suffix}")


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write rows as JSONL or Parquet (by suffix), through a temporary file so that a crash leaves no half file."""
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"the output must end in {' or '.join(OUTPUT_SUFFIXES)}, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if path.suffix == ".parquet":
            import pandas as pd

            pd.DataFrame(list(rows)).to_parquet(tmp, index=False)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def check_writable(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Raise a ValueError before any scoring when ``rows`` cannot be written as Parquet (e.g. a column that
    holds strings in some rows and message lists in others)."""
    if path.suffix != ".parquet":
        return
    import pandas as pd
    import pyarrow as pa

    try:
        pa.Table.from_pandas(pd.DataFrame(list(rows)), preserve_index=False)
    except (pa.ArrowTypeError, pa.ArrowInvalid) as err:
        raise ValueError(
            f"these rows cannot be written as Parquet ({err}); columns that mix strings and message lists need a "
            ".jsonl --output"
        ) from err


def missing_columns(row: Mapping[str, Any], prompt_column: str, completion_column: str) -> str | None:
    """What a row lacks of the prompt and completion columns (``"has no [...] column …"``), or ``None``."""
    missing = [c for c in (prompt_column, completion_column) if c not in row]
    if not missing:
        return None
    return (
        f"has no {missing} column (its columns: {sorted(row)}); expected a '{prompt_column}' and a "
        f"'{completion_column}' per row (TRL's prompt-completion format)"
    )


def reserved_clash(names: set[str], prompt_column: str, completion_column: str) -> str | None:
    """The columns among ``names`` that take the names of the reward call's own arguments, or ``None``."""
    clash = sorted((names - {prompt_column, completion_column}) & set(reserved_columns()))
    if not clash:
        return None
    return f"the data has column(s) {clash}, names the reward call uses for its own arguments; rename them"


def taken_column(names: set[str], column: str) -> str | None:
    """Why the new column's name is taken, or ``None``."""
    if column not in names:
        return None
    return (
        f"the data already has a '{column}' column; name the new one with --column (e.g. --column {column}_2)"
    )


def row_problem(
    row: Mapping[str, Any], prompt_column: str, completion_column: str, column: str
) -> str | None:
    """Why one row cannot be scored into ``column`` (the checks of :func:`run_score`, row by row), or ``None``."""
    names = set(row)
    return (
        missing_columns(row, prompt_column, completion_column)
        or reserved_clash(names, prompt_column, completion_column)
        or taken_column(names, column)
    )


def check_rows(
    rows: Sequence[Mapping[str, Any]], prompt_column: str, completion_column: str, source: str = ""
) -> None:
    """Raise a ValueError naming the first row (counted from 1, in the file ``source``) that lacks the prompt or
    completion column, or the columns that take the names of the reward call's own arguments."""
    where = f"{source}, " if source else ""
    for number, row in enumerate(rows, start=1):
        missing = missing_columns(row, prompt_column, completion_column)
        if missing:
            raise ValueError(f"{where}row {number} {missing}")
    clash = reserved_clash({k for row in rows for k in row}, prompt_column, completion_column)
    if clash:
        raise ValueError(clash)


# -- scoring --------------------------------------------------------------------------------------------------


def score_rows(
    reward: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 64,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    progress: bool = True,
) -> tuple[list[float | None], dict[str, int]]:
    """One reward per row (``None`` where there is none), scored ``batch_size`` rows per call, and the sums of
    the reward's ``num_*`` counters over the calls."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_rows(rows, prompt_column, completion_column)
    rewards: list[float | None] = []
    counts: dict[str, int] = {}
    bar = tqdm(total=len(rows), desc="score", unit="row", disable=not progress)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        names = {k for row in batch for k in row} - {prompt_column, completion_column}
        columns = {name: [row.get(name) for row in batch] for name in sorted(names)}
        values = reward(
            [row[prompt_column] for row in batch], [row[completion_column] for row in batch], **columns
        )
        if len(values) != len(batch):
            raise RuntimeError(f"the reward returned {len(values)} values for {len(batch)} rows")
        rewards += [None if v is None or math.isnan(v) else float(v) for v in values]
        for key, value in (getattr(reward, "last_stats", None) or {}).items():
            if key.startswith("num_") and key != "num_none":
                counts[key] = counts.get(key, 0) + int(value)
        bar.update(len(batch))
    bar.close()
    return rewards, counts
