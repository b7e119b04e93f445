"""Reading the files users hand to rh_trl — rows (JSONL, JSON, Parquet) and YAML configs — with errors that name
the file and the 1-based line, and say what was expected."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROW_SUFFIXES = (".jsonl", ".json", ".parquet")


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; expected {what}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {what}")
    return path


def parse_jsonl(lines: Iterable[str], path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON object on each non-blank line; a line that is not one is a ValueError naming ``path`` and it."""
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}); expected one JSON "
                "object per line"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}, line {number}: a JSON {type(row).__name__}, expected one JSON object ({{…}}) per line"
            )
        rows.append(row)
    return rows


def parse_json(text: str, path: str | os.PathLike) -> Any:
    """``text`` as JSON; malformed JSON is a ValueError naming ``path`` and the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}, line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
        ) from None


def read_text(path: Path, opener: Any = open) -> str:
    """The file's text; bytes that are not UTF-8 are a ValueError naming the file."""
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {err.start}); expected a JSON, JSONL or YAML text file"
        ) from None
    except gzip.BadGzipFile as err:
        raise ValueError(f"{path}: not a gzip file ({err})") from None


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL (one object per line), JSON (a list of objects) or Parquet file."""
    what = "a JSONL, JSON or Parquet file of rows"
    path = _existing_file(path, what)
    if path.suffix == ".parquet":
        import pandas as pd

        try:
            return pd.read_parquet(path).to_dict(orient="records")
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    if path.suffix == ".jsonl":
        return parse_jsonl(read_text(path).splitlines(), path)
    if path.suffix == ".json":
        data = parse_json(read_text(path), path)
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise ValueError(f"{path}: expected a JSON list of row objects, got a {type(data).__name__}")
        return data
    raise ValueError(f"{path}: the file name must end in {', '.join(ROW_SUFFIXES)}; expected {what}")


def read_yaml(path: str | os.PathLike, what: str = "a YAML file") -> Any:
    """A YAML (or JSON) file's content; a syntax error is a ValueError naming the file and the line."""
    import yaml

    path = _existing_file(path, what)
    try:
        return yaml.safe_load(read_text(path))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ValueError(
            f"{path}{where}: not valid YAML ({err.problem or err.context}); expected {what}"
        ) from None
