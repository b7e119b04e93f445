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
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rh_trl.cli.parser import help_text, json_object
from rh_trl.cli.scoring import (
    OUTPUT_SUFFIXES,
    ScoreSummary,
    check_rows,
    check_writable,
    default_output,
    plain,
    score_rows,
    taken_column,
    write_rows,
)
from rh_trl.data.files import read_rows
from rh_trl.options import did_you_mean

logger = logging.getLogger("rh_trl")


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
