"""Preference data: read the common formats into one shape, and tokenize pairs the way rewards score them.

Every loader returns rows ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`` in TRL's
conversational format (plus ``margin`` and ``subset`` when the source has them). Formats:

* ``trl``: TRL's preference format — explicit ``prompt`` with ``chosen``/``rejected`` (strings or messages),
  or implicit prompt (whole ``chosen``/``rejected`` conversations sharing every turn but the last).
* ``rlhflow``: RLHFlow's standard format — ``chosen``/``rejected`` whole conversations sharing the prompt
  (the implicit-prompt case of ``trl``).
* ``hh``: Anthropic HH text, ``"\\n\\nHuman: …\\n\\nAssistant: …"`` strings, converted to conversations.
* ``llmbar``: ``{"input", "output_1", "output_2", "label"}`` with ``label`` 1 or 2 naming the better output.

:func:`tokenize_pairs` renders pairs with :class:`~rh_trl.formatting.ChatFormatter` — the same code that
:class:`~rh_trl.ORM` scores with, so a model is trained on exactly the layout it is later scored on — and
truncates long pairs from the left of the prompt instead of dropping them.
"""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rh_trl.data.files import parse_json, parse_jsonl, read_text
from rh_trl.formatting import ChatFormatter, Conversation, RewardInputError, to_sample

logger = logging.getLogger("rh_trl")

FORMATS = ("auto", "trl", "rlhflow", "hh", "llmbar")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


class PreferenceDataError(ValueError):
    """Preference data that cannot be read into chosen/rejected pairs."""


# -- reading files ------------------------------------------------------------------------------------------------


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl``, ``.jsonl.gz``, ``.json`` (a list of objects) or ``.parquet`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"preference data file '{path}' does not exist")
    name = path.name.lower()
    if name.endswith(".parquet"):
        import datasets

        return list(datasets.Dataset.from_parquet(str(path)))
    text = read_text(path, gzip.open if name.endswith(".gz") else open)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return parse_jsonl(text.splitlines(), path)
    data = parse_json(text, path)
    if not isinstance(data, list):
        raise PreferenceDataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    return data


# -- conversions ----------------------------------------------------------------------------------------------------


def hh_to_messages(text: str) -> Conversation:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` → ``[{"role": "user", …}, {"role": "assistant", …}]``."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise PreferenceDataError(f"not in HH format ('\\n\\nHuman: …\\n\\nAssistant: …'): {text[:80]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def split_shared_prompt(chosen: Conversation, rejected: Conversation, row: int) -> dict[str, Conversation]:
    """Split two whole conversations into the shared prompt and the two final assistant turns."""
    if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise PreferenceDataError(f"row {row}: chosen and rejected must both end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise PreferenceDataError(
            f"row {row}: chosen and rejected do not share their prompt (every turn but the last must be equal)"
        )
    if not chosen[:-1]:
        raise PreferenceDataError(f"row {row}: the conversations have no prompt turn before the answer")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _messages(value: Any, role: str) -> Conversation:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def detect_format(record: dict[str, Any]) -> str:
    """Guess a record's format from its keys and values."""
    if {"input", "output_1", "output_2", "label"} <= set(record):
        return "llmbar"
    if "chosen" not in record or "rejected" not in record:
        raise PreferenceDataError(
            f"a preference row needs 'chosen' and 'rejected' columns (or LLMBar's input/output_1/output_2/label); "
            f"got columns {sorted(record)}"
        )
    if (
        "prompt" not in record
        and isinstance(record["chosen"], str)
        and record["chosen"].startswith("\n\nHuman: ")
    ):
        return "hh"
    return "trl"


def to_pair(record: dict[str, Any], fmt: str, row: int) -> dict[str, Any]:
    """One record in ``fmt`` → ``{"prompt", "chosen", "rejected"}`` conversations (+ margin/subset if present)."""
    if fmt == "llmbar":
        if record["label"] not in (1, 2):
            raise PreferenceDataError(f"row {row}: LLMBar label must be 1 or 2, got {record['label']!r}")
        better, worse = ("output_1", "output_2") if record["label"] == 1 else ("output_2", "output_1")
        record = {"prompt": record["input"], "chosen": record[better], "rejected": record[worse]}
        fmt = "trl"
    missing = [c for c in ("chosen", "rejected") if c not in record]
    if missing:
        raise PreferenceDataError(
            f"row {row}: missing column(s) {missing}; a preference row needs 'chosen' and 'rejected'"
        )
    if fmt == "hh":
        pair = split_shared_prompt(hh_to_messages(record["chosen"]), hh_to_messages(record["rejected"]), row)
    elif "prompt" in record and record["prompt"] is not None:
        pair = {
            "prompt": _messages(record["prompt"], "user"),
            "chosen": _messages(record["chosen"], "assistant"),
            "rejected": _messages(record["rejected"], "assistant"),
        }
    else:  # implicit prompt: TRL's implicit format and RLHFlow's standard format
        pair = split_shared_prompt(
            _messages(record["chosen"], "user"), _messages(record["rejected"], "user"), row
        )
    for key in ("margin", "subset"):
        if key in record:
            pair[key] = record[key]
    return pair


def load_pairs(
    source: str | Path | Iterable[dict[str, Any]],
    fmt: str = "auto",
    subset: str | None = None,
    skip_invalid: bool = False,
) -> list[dict[str, Any]]:
    """Read preference pairs from a file or rows (see the module docstring for formats).

    A row that cannot be read raises :class:`PreferenceDataError` naming the file and the row (counted from 1);
    with ``skip_invalid`` it is left out instead, and the number left out is logged (real data has a few, e.g. HH
    dialogues whose chosen and rejected versions diverge before the last turn).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown preference format '{fmt}'; expected one of {FORMATS}")
    records = read_records(source) if isinstance(source, str | Path) else list(source)
    if not records:
        raise PreferenceDataError(
            f"no rows in {source if isinstance(source, str | Path) else 'the given rows'}"
        )
    where = f"{source}, " if isinstance(source, str | Path) else ""
    pairs = []
    skipped: list[str] = []
    for row, record in enumerate(records, start=1):
        try:
            pair = to_pair(record, detect_format(record) if fmt in ("auto", "rlhflow") else fmt, row)
        except PreferenceDataError as err:
            message = f"{where}{err}" if str(err).startswith("row ") else f"{where}row {row}: {err}"
            if not skip_invalid:
                raise PreferenceDataError(message) from None
            skipped.append(message)
            continue
        if subset is not None:
            pair.setdefault("subset", subset)
        pairs.append(pair)
    if skipped:
        logger.warning(
            "left out %d of %d preference rows that could not be read (first: %s)",
            len(skipped),
            len(records),
            skipped[0],
        )
    if not pairs:
        raise PreferenceDataError(f"no preference pairs left: all {len(records)} rows were invalid")
    return pairs


def split_pairs(pairs: Sequence[dict[str, Any]], eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """A reproducible shuffle-and-split into (train, held-out)."""
    import random

    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(pairs) * eval_fraction)
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def training_and_held_out(
    pairs: Sequence[dict[str, Any]],
    held_out: Sequence[dict[str, Any]] | None,
    *,
    eval_fraction: float,
    seed: int = 0,
    max_pairs: int | None = None,
) -> tuple[list, list]:
    """(train, held-out): ``held_out`` when given (a separate file) with every pair for training, else a
    :func:`split_pairs` split; training cut to ``max_pairs``. A :class:`PreferenceDataError` when no training pair
    is left."""
    if held_out is not None:
        train, held_out = list(pairs), list(held_out)
    else:
        train, held_out = split_pairs(pairs, eval_fraction, seed)
    if max_pairs is not None:
        train = train[:max_pairs]
    if not train:
        raise PreferenceDataError(
            f"no training pairs: {len(pairs)} pairs read, eval_fraction={eval_fraction}, max_pairs={max_pairs}"
        )
    return train, held_out


# -- tokenization -----------------------------------------------------------------------------------------------------


def tokenize_pairs(
    pairs: Sequence[dict[str, Any]], formatter: ChatFormatter
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """``chosen_ids``/``rejected_ids`` for TRL's ``RewardTrainer``, rendered exactly as :class:`ORM` scores.

    Long pairs lose prompt tokens from the left (never dropped). Returns the rows and counts
    ``{"pairs", "truncated", "response_truncated"}``.
    """
    rows: list[dict[str, Any]] = []
    counts = {"pairs": 0, "truncated": 0, "response_truncated": 0}
    for i, pair in enumerate(pairs):
        row: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            try:
                encoded = formatter.encode(to_sample(pair["prompt"], pair[side]))
            except RewardInputError as err:
                raise PreferenceDataError(f"pair {i}, {side}: {err}") from err
            row[f"{side}_ids"] = encoded.input_ids
            if encoded.truncated == "prompt":
                counts["truncated"] += 1
            elif encoded.truncated == "response":
                counts["response_truncated"] += 1
        if "margin" in pair:
            row["margin"] = float(pair["margin"])
        rows.append(row)
    counts["pairs"] = len(rows)
    if not rows:
        raise PreferenceDataError("no preference pairs left to train on (0 rows after filtering)")
    return rows, counts
