"""``rh-trl score --ray`` and ``rh-trl annotate --ray``: rows read with Ray Data and scored by a pool of actors,
each of which builds the reward(s) once from the same specs as the local commands (needs ``rh_trl[ray]``).

Rows travel as their JSON text (a JSONL line as it is in the file; a Parquet or JSON row as plain values), so an
actor sees exactly the Python values the local command reads, and the output has the same columns and ``null``s.
Blocks come back in input order; the driver appends each finished block to a partial output and records, after
it, the rows done and the output's size (as ``annotate`` does for its chunks). A restarted run cuts the partial
output back to that size and scores only the rows after it, so no finished block is scored twice; a restart with
other settings or another input is refused, naming what changed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("rh_trl")


@dataclass
class RayOptions:
    """Where and how wide: the cluster (``address``: ``auto`` for a running one, none for a local Ray),
    ``actors`` in the pool (each loads the reward once), and ``actor_options`` for each (``num_cpus``,
    ``num_gpus``, ``memory``, ``resources``)."""

    address: str | None = None
    actors: int = 2
    actor_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError(f"the actor pool needs at least 1 actor, got {self.actors}")


def import_ray() -> Any:
    """``ray``, or an ImportError naming the extra that brings it."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray[data])
    except ImportError as err:
        raise ImportError(f"--ray needs Ray Data ({err}); pip install 'rh_trl[ray]'") from err
    return ray


def connect(address: str | None) -> Any:
    """Join the Ray cluster at ``address``, or start a local one, unless this process is already connected."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


# -- reading --------------------------------------------------------------------------------------------------


def _rows_as_json(batch: Any) -> dict[str, list[str]]:
    from rh_trl.cli.scoring import plain

    return {"row": [json.dumps(plain(row), ensure_ascii=False) for row in batch.to_dict(orient="records")]}


def read_dataset(path: str | os.PathLike) -> Any:
    """A Ray Dataset of the rows of a JSONL, Parquet or JSON file, one column ``row`` holding each row's JSON
    text, in file order (blank JSONL lines are left out, as the local commands do)."""
    ray = import_ray()
    from rh_trl.data.files import ROW_SUFFIXES, read_rows

    path = Path(path)
    if not path.is_file():
        read_rows(path)  # the local commands' error: no such file, or a directory
    reading = {"num_cpus": 0}  # reading is light: it must never wait for the CPUs the scoring actors hold
    if path.suffix == ".jsonl":
        return ray.data.read_text(str(path), ray_remote_args=reading).map_batches(
            lambda b: {"row": [line for line in b["text"] if line.strip()]}, batch_format="numpy"
        )
    if path.suffix == ".parquet":
        return ray.data.read_parquet(str(path), ray_remote_args=reading).map_batches(
            _rows_as_json, batch_format="pandas"
        )
    if path.suffix == ".json":  # one JSON document: read here, then handed to Ray Data
        return ray.data.from_items([{"row": json.dumps(row, ensure_ascii=False)} for row in read_rows(path)])
    raise ValueError(f"{path}: the file name must end in {', '.join(ROW_SUFFIXES)}")


def parse_row(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """A row from its JSON text, or the reason it is not one."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno}); expected one JSON object per line"
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__}, expected one JSON object ({{…}}) per row"
    return row, None


# -- the resumable driver loop --------------------------------------------------------------------------------


def scored_batches(
    data: str | os.PathLike,
    actor: type,
    actor_kwargs: dict[str, Any],
    options: RayOptions,
    skip: int,
    batch_size: int,
) -> Iterator[dict[str, list[Any]]]:
    """The rows of ``data`` after the first ``skip``, scored by a pool of ``actor``s in batches of
    ``batch_size`` rows, handed back in input order as blocks of one batch per actor (each a dict of
    columns)."""
    ray = connect(options.address)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    dataset = read_dataset(data)
    if skip:
        dataset = dataset.split_at_indices([skip])[1]
    scored = dataset.map_batches(
        actor,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        **options.actor_options,
    )
    for block in scored.iter_batches(batch_size=batch_size * options.actors, batch_format="pandas"):
        yield {name: list(block[name]) for name in block.columns}


def bad_row(data: str | os.PathLike, number: int, problem: str) -> ValueError:
    return ValueError(f"{data}, row {number}: {problem}")


# -- rh-trl score --ray -----------------------------------------------------------------------------------------


class ScoreActor:
    """Loads the reward once (:func:`rh_trl.load`) and scores batches of JSON rows as ``rh-trl score`` does."""

    def __init__(self, load_args: dict[str, Any], columns: dict[str, str], batch_size: int) -> None:
        from rh_trl.registry import load

        self.reward = load(load_args["model"], **load_args["kwargs"])
        self.columns = columns
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from rh_trl.cli.scoring import row_problem, score_rows

        c = self.columns
        rows, problems = [], []
        for text in batch["row"]:
            row, problem = parse_row(str(text))
            if problem is None:
                problem = row_problem(row, c["prompt"], c["completion"], c["reward"])
            rows.append(row)
            problems.append(problem)
        n = len(rows)
        if any(problems):  # the driver stops at the first one; nothing of this batch is scored
            return {
                "line": [""] * n,
                "reward": [math.nan] * n,
                "problem": [p or "" for p in problems],
                "meta": [""] * n,
            }
        rewards, counts = score_rows(
            self.reward,
            rows,
            batch_size=self.batch_size,
            prompt_column=c["prompt"],
            completion_column=c["completion"],
            progress=False,
        )
        lines = [
            json.dumps({**row, c["reward"]: value}, ensure_ascii=False, allow_nan=False) + "\n"
            for row, value in zip(rows, rewards, strict=True)
        ]
        meta = json.dumps(
            {"counts": counts, "reward": f"{self.reward.__name__} ({type(self.reward).__name__})"}
        )
        return {
            "line": lines,
            "reward": [math.nan if v is None else v for v in rewards],
            "problem": [""] * n,
            "meta": [meta] + [""] * (n - 1),
        }


def score_on_ray(args: Any, output: Path, options: RayOptions) -> Any:
    """``rh-trl score --ray``: the local command's output and summary, scored on a Ray Data actor pool; the
    partial output lives in ``<output>.partial/`` until the last block is written."""
    from rh_trl.cli.annotation import file_sha256
    from rh_trl.cli.resumable import Progress
    from rh_trl.cli.scoring import ScoreSummary, check_writable, write_rows

    load_args = {
        "model": args.model,
        "kwargs": {"engine": args.engine, "family": args.family, **(args.options or {})},
    }
    columns = {"prompt": args.prompt_column, "completion": args.completion_column, "reward": args.column}
    settings = {
        "load": load_args,
        "columns": columns,
        "batch_size": args.batch_size,
        "input_sha256": file_sha256(args.data),
        "output": output.name,
    }
    partial = output.with_name(output.name + ".partial")
    progress = Progress(partial, settings, ("rows.jsonl", "rewards.f64"))
    counts: dict[str, int] = progress.state.get("counts", {})
    reward = progress.state.get("reward")
    for block in scored_batches(
        args.data, ScoreActor, {"load_args": load_args, "columns": columns, "batch_size": args.batch_size},
        options, progress.rows_done, args.batch_size,
    ):  # fmt: skip
        for k, problem in enumerate(block["problem"]):
            if problem:
                raise bad_row(args.data, progress.rows_done + k + 1, problem)
        for meta in filter(None, block["meta"]):
            found = json.loads(meta)
            reward = found["reward"]
            for key, value in found["counts"].items():
                counts[key] = counts.get(key, 0) + value
        appended = {
            "rows.jsonl": "".join(block["line"]).encode(),
            "rewards.f64": struct.pack(f"<{len(block['reward'])}d", *block["reward"]),
        }
        progress.commit(len(block["line"]), appended, counts=counts, reward=reward)
    if not progress.rows_done:
        raise ValueError(f"{args.data} holds no rows")
    raw = (partial / "rewards.f64").read_bytes()
    rewards = [None if math.isnan(v) else v for v in struct.unpack(f"<{len(raw) // 8}d", raw)]
    if output.suffix == ".parquet":
        with open(partial / "rows.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        check_writable(rows, output)  # the local command's error (it checks before scoring; here, after)
        write_rows(rows, output)
    else:
        os.replace(partial / "rows.jsonl", output)
    shutil.rmtree(partial)
    return ScoreSummary.of(str(output), rewards, str(reward), counts)


# -- rh-trl annotate --ray --------------------------------------------------------------------------------------


class AnnotateActor:
    """Builds the rewards once (:func:`rh_trl.rewards.factory.build_rewards`) and scores every row's responses
    with their weighted sum, as ``rh-trl annotate`` does."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        from rh_trl.rewards.factory import build_rewards

        self.rewards, self.weights = build_rewards(specs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from rh_trl.cli.annotation import as_completion, combined_scores, row_problem

        rows, problems = [], []
        for text in batch["row"]:
            row, problem = parse_row(str(text))
            rows.append(row)
            problems.append(problem or row_problem(row))
        n = len(rows)
        if any(problems):
            return {"row": list(batch["row"]), "scores": [""] * n, "problem": [p or "" for p in problems]}
        prompts = [row["prompt"] for row in rows for _ in row["responses"]]
        flat = [as_completion(row["prompt"], r) for row in rows for r in row["responses"]]
        scores = combined_scores(self.rewards, self.weights, prompts, flat)
        out, pos = [], 0
        for row in rows:
            out.append(json.dumps(scores[pos : pos + len(row["responses"])]))
            pos += len(row["responses"])
        return {"row": list(batch["row"]), "scores": out, "problem": [""] * n}


def annotated_chunks(
    data: str | os.PathLike, specs: list[dict[str, Any]], options: RayOptions, chunk_size: int
) -> Callable[[int], Iterator[list[tuple[Any, list[Any], list[float | None]]]]]:
    """The chunk source of :func:`rh_trl.cli.annotate.annotate` on Ray Data: ``chunks(rows_done)`` gives, for each
    chunk of ``chunk_size`` rows after the first ``rows_done``, ``(prompt, responses, scores)`` per row, in input
    order; a bad row is a ValueError naming it."""

    def chunks(rows_done: int) -> Iterator[list[tuple[Any, list[Any], list[float | None]]]]:
        chunk: list[tuple[Any, list[Any], list[float | None]]] = []
        number = rows_done
        for block in scored_batches(data, AnnotateActor, {"specs": specs}, options, rows_done, chunk_size):
            for text, scores, problem in zip(block["row"], block["scores"], block["problem"], strict=True):
                number += 1
                if problem:
                    raise bad_row(data, number, problem)
                row = json.loads(text)
                chunk.append((row["prompt"], list(row["responses"]), json.loads(scores)))
                if len(chunk) == chunk_size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    return chunks


def count_rows(data: str | os.PathLike, options: RayOptions) -> int:
    """The number of rows Ray Data reads from ``data``."""
    connect(options.address)
    return int(read_dataset(data).count())


__all__ = ["RayOptions", "annotated_chunks", "count_rows", "read_dataset", "score_on_ray"]
