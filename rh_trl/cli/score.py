"""``rh-trl score``: score the prompt/completion rows of a file with any reward and write them back with a reward
column.

    rh-trl score --model Skywork/Skywork-Reward-V2-Llama-3.1-8B --data rows.jsonl --output scored.jsonl
    rh-trl score --model Qwen/Qwen2.5-Math-PRM-7B --engine vllm --data rows.parquet --column prm
    rh-trl score --model ./my-prm --family prm --options '{"kind": "next_token"}' --data rows.jsonl
    rh-trl score --model rh_trl:tiny-rm --data rows.jsonl

The reward is built by :func:`rh_trl.load` (``--model``, ``--engine``, ``--family``, ``--options``). Rows
(JSONL, JSON or Parquet) hold a ``prompt`` and a ``completion`` in either TRL format (strings, or lists of
``{"role", "content"}`` messages); their other columns reach the reward as dataset columns (e.g. ``reference``
for a pairwise model). Rows are scored ``--batch-size`` at a time, in order, and written (``.jsonl`` or
``.parquet``, by the output's suffix; default ``<input>.scored.jsonl``) with every input column kept and the
reward in ``--column``; a sample without a reward gets ``null``, never a made-up number. An existing output is
replaced only with ``--overwrite``. A short summary (rows, mean, number of nulls, the reward's counters) is
printed. With ``--ray`` the rows are scored on a Ray Data actor pool instead (``rh_trl[ray]``):
the same output and summary, and a killed run started again resumes after its last
finished block.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rh_trl.cli.parser import help_text, json_object
from rh_trl.datafiles import read_rows
from rh_trl.options import did_you_mean
from rh_trl.stats import summarize

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


def run_score(args: argparse.Namespace) -> ScoreSummary:
    """Run ``rh-trl score`` from parsed arguments: load, score, write, print the summary (with ``--ray``, on a
    Ray Data actor pool: :func:`rh_trl.cli.ray_data.score_on_ray`)."""
    output = Path(args.output) if args.output else default_output(args.data)
    if output.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--output must end in {' or '.join(OUTPUT_SUFFIXES)}, got {output}")
    if output.exists() and not args.overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it, or choose another --output")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    from rh_trl.registry import ENGINES, FAMILIES, load

    for flag, value, valid in (
        ("--engine", args.engine, ENGINES),
        ("--family", args.family, sorted(FAMILIES)),
    ):
        if value is not None and value not in valid:
            raise ValueError(f"{flag} {value!r} is not one of {', '.join(valid)}{did_you_mean(value, valid)}")
    if getattr(args, "ray", False):
        from rh_trl.cli.ray_data import RayOptions, score_on_ray

        actors = 2 if args.ray_actors is None else args.ray_actors
        options = RayOptions(args.ray_address, actors, args.ray_actor_options or {})
        summary = score_on_ray(args, output, options)
        print(summary.report())
        return summary
    rows = [plain(row) for row in read_rows(args.data)]
    if not rows:
        raise ValueError(f"{args.data} holds no rows")
    taken = taken_column({k for row in rows for k in row}, args.column)
    if taken:
        raise ValueError(taken)
    check_rows(rows, args.prompt_column, args.completion_column, source=str(args.data))
    check_writable([{**row, args.column: 0.0} for row in rows], output)
    reward = load(args.model, engine=args.engine, family=args.family, **(args.options or {}))
    rewards, counts = score_rows(
        reward,
        rows,
        batch_size=args.batch_size,
        prompt_column=args.prompt_column,
        completion_column=args.completion_column,
        progress=not args.no_progress,
    )
    write_rows([{**row, args.column: value} for row, value in zip(rows, rewards, strict=True)], output)
    summary = ScoreSummary.of(str(output), rewards, f"{reward.__name__} ({type(reward).__name__})", counts)
    print(summary.report())
    return summary


# -- command line ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--model", required=True, help="hub id, local model directory, rh_trl:tiny-rm, or drsow"
    )
    parser.add_argument(
        "--data", required=True, help="JSONL / JSON / Parquet rows with prompt and completion"
    )
    parser.add_argument(
        "--output", default=None, help="scored rows, .jsonl or .parquet (default <data>.scored)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--column", default="reward", help="name of the new column (default: reward)")
    parser.add_argument("--engine", default="hf", help="where the reward runs: hf (default), vllm or openai")
    parser.add_argument(
        "--family",
        default=None,
        help="pick the reward class by hand: orm, prm, pairwise, cloud, drsow or embedding",
    )
    parser.add_argument(
        "--options",
        default=None,
        type=json_object,
        metavar="JSON",
        help="keyword arguments of the reward class, e.g. '{\"max_length\": 4096}'",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="rows per reward call (default: 64)")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--completion-column", default="completion")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_ray_arguments(parser, "rh-trl score")
    return parser


def add_ray_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """``--ray`` and its settings, shared by ``score`` and ``annotate`` (rh_trl[ray])."""
    parser.add_argument(
        "--ray",
        action="store_true",
        default=None,
        help=f"score on a Ray Data actor pool (rh_trl[ray]); a restarted {command} --ray resumes after the last "
        "finished block",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster to join ('auto': a running one; default: a local Ray)",
    )
    parser.add_argument(
        "--ray-actors", type=int, default=None, help="actors in the pool, one reward load each (2)"
    )
    parser.add_argument(
        "--ray-actor-options",
        type=json_object,
        default=None,
        metavar="JSON",
        help="resources of each actor, e.g. '{\"num_gpus\": 1}' (num_cpus, num_gpus, memory, resources)",
    )


def add_score_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``score`` command to an argparse ``subparsers``; it runs :func:`run_score` (set as ``func``)."""
    parser = subparsers.add_parser(
        "score",
        help="score prompt/completion rows with any reward model; write them back with a reward column",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_score)
    return parser


def main(argv: Sequence[str] | None = None) -> ScoreSummary:
    """``python -m rh_trl.cli.score …``: the score command on its own."""
    parser = argparse.ArgumentParser(
        prog="rh-trl score",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return run_score(add_arguments(parser).parse_args(list(argv) if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
