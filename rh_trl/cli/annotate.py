"""Best-of-N and preference annotation: score N responses per prompt, write pairs and best-of-N picks.

Input rows (JSONL/JSON/Parquet) hold a ``prompt`` and a list of ``responses`` (strings or assistant
message lists), or only a ``prompt`` when a ``policy`` generates ``num_samples`` responses. Every response
is scored by the rewards (their weighted sum; a response with any ``None`` reward is left out, counted).
Outputs, in ``output_dir``:

- ``pairs.jsonl``: ``{prompt, chosen, rejected, score_chosen, score_rejected, margin}``; with
  ``pairs="best_worst"`` one pair per prompt (best vs worst, ties skipped), with ``pairs="all"`` every pair
  whose score difference exceeds ``margin``;
- ``best_of_n.jsonl``: ``{prompt, response, score, scores}`` (the best response and every score);
- ``state.json``: rows done, the byte size of each output after the last finished chunk, and the settings
  of the run (including a SHA-256 of the input rows and, from the command line, of the input file).

Rows are processed in chunks; after each chunk the outputs are appended and flushed, then the state file is
replaced atomically. A restarted run cuts the outputs back to the sizes the state records (dropping a chunk
that was half written when the run died) and continues after the recorded rows, so a run killed anywhere and
restarted writes exactly the rows of an uninterrupted one. Generation is seeded per chunk for the same reason.
A restart with other settings (rewards, pairing, generation settings such as seed or temperature, or other
input rows) is refused with an error naming what changed, never mixed into the old output.

    rh-trl annotate data.jsonl --output-dir out/ --reward '{"type": "orm", "model": "Skywork/..."}'
    rh-trl annotate data.jsonl --output-dir out/ --reward '…' --ray   # scored on a Ray Data actor pool
    python recipes/annotate.py --config configs/annotate/tiny.yaml
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rh_trl.cli.annotation import as_completion, combined_scores, file_sha256, row_problem
from rh_trl.cli.parser import help_text, json_object
from rh_trl.cli.resumable import STATE_FILE, Progress, settings_changes  # noqa: F401  (re-exported)
from rh_trl.cli.score import add_ray_arguments
from rh_trl.data.files import read_rows, read_yaml
from rh_trl.options import did_you_mean

logger = logging.getLogger("rh_trl")

OUTPUTS = ("pairs.jsonl", "best_of_n.jsonl")
PAIR_MODES = ("best_worst", "all")


@dataclass
class AnnotateResult:
    """What one run wrote (counts over the whole output, resumed chunks included)."""

    output_dir: str
    rows: int
    pairs: int
    best: int
    unscored: int = 0
    skipped_ties: int = 0
    counts: dict[str, int] = field(default_factory=dict)


# -- reading --------------------------------------------------------------------------------------------------


# -- generation -----------------------------------------------------------------------------------------------


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    num_samples: int,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int | None = None,
) -> list[list[str]]:
    """``num_samples`` sampled responses per prompt with transformers ``generate`` (chat template for
    conversational prompts, the text itself otherwise)."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[list[str]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            texts = [
                p
                if isinstance(p, str)
                else tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                for p in chunk
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.inference_mode():
                ids = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=num_samples,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = ids[:, enc["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
            out.extend(decoded[i : i + num_samples] for i in range(0, len(decoded), num_samples))
    finally:
        tokenizer.padding_side = padding_side
    return out


def generate_responses_vllm(
    model_path: str,
    prompts: Sequence[Any],
    num_samples: int,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    **llm_kwargs: Any,
) -> list[list[str]]:
    """``num_samples`` responses per prompt with an in-process vLLM engine (``pip install 'rh_trl[vllm]'``)."""
    from rh_trl.engines.vllm_pooling import import_vllm

    vllm = import_vllm()
    llm = vllm.LLM(model=model_path, seed=seed or 0, **llm_kwargs)
    params = vllm.SamplingParams(
        n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens
    )
    if all(isinstance(p, str) for p in prompts):
        outputs = llm.generate(list(prompts), params, use_tqdm=False)
    else:
        outputs = llm.chat([list(p) for p in prompts], params, use_tqdm=False)
    responses = [[o.text for o in request.outputs] for request in outputs]
    del llm
    return responses


# -- scoring and selection ------------------------------------------------------------------------------------


def select(
    prompt: Any, responses: Sequence[Any], scores: Sequence[float | None], pairs: str, margin: float
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, bool]:
    """Preference pairs and the best-of-N row for one prompt; also whether it was a tie (best == worst)."""
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if not scored:
        return [], None, False
    best_score, best_i = max(scored, key=lambda t: (t[0], -t[1]))  # first of equal scores
    best = {"prompt": prompt, "response": responses[best_i], "score": best_score, "scores": list(scores)}

    def pair(i: int, j: int) -> dict[str, Any]:
        return {
            "prompt": prompt,
            "chosen": as_completion(prompt, responses[i]),
            "rejected": as_completion(prompt, responses[j]),
            "score_chosen": scores[i],
            "score_rejected": scores[j],
            "margin": scores[i] - scores[j],  # type: ignore[operator]
        }

    if pairs == "best_worst":
        worst_score, worst_i = min(scored, key=lambda t: (t[0], t[1]))
        if len(scored) < 2 or worst_score == best_score or best_score - worst_score <= margin:
            return [], best, len(scored) >= 2 and worst_score == best_score
        return [pair(best_i, worst_i)], best, False
    out = []
    for (si, i), (sj, j) in itertools.combinations(scored, 2):
        if abs(si - sj) > margin and si != sj:
            out.append(pair(i, j) if si > sj else pair(j, i))
    return out, best, False


# -- the resumable job ----------------------------------------------------------------------------------------


def rows_sha256(rows: Sequence[Mapping[str, Any]]) -> str:
    """A SHA-256 of the rows' content (canonical JSON; arrays from Parquet as lists)."""

    def plain(value: Any) -> Any:
        return value.tolist() if hasattr(value, "tolist") else str(value)

    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=plain, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def _jsonl(rows: Sequence[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


#: ``chunks(rows_done)`` → for each chunk after the first ``rows_done`` rows, ``(prompt, responses, scores)`` per row
ChunkSource = Callable[[int], Iterator[list[tuple[Any, list[Any], list[float | None]]]]]


def annotate(
    rows: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    rewards: Sequence[Callable[..., Any]],
    weights: Sequence[float] | None = None,
    *,
    pairs: str = "best_worst",
    margin: float = 0.0,
    chunk_size: int = 64,
    generate: Callable[[list[Any], int], list[list[Any]]] | None = None,
    progress: bool = True,
    fingerprint: Mapping[str, Any] | None = None,
    chunks: ChunkSource | None = None,
    num_rows: int | None = None,
) -> AnnotateResult:
    """Score every row's responses and write pairs and best-of-N rows (module docstring); resumes if possible.

    Args:
        rows: input rows with ``prompt`` and ``responses`` (or only ``prompt`` with ``generate``).
        generate: ``generate(prompts, chunk_index) -> responses per prompt``, for rows without responses.
        fingerprint: settings that must match for a resume (a different one is an error, not a silent mix).
        chunks: where the scored chunks come from instead of scoring ``rows`` here (``rh-trl annotate --ray``:
            :func:`rh_trl.cli.ray_data.annotated_chunks`); ``num_rows`` is then the number of input rows.
    """
    if pairs not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {PAIR_MODES}, got {pairs!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    weights = list(weights) if weights is not None else [1.0] * len(rewards)
    if len(weights) != len(rewards):
        raise ValueError(f"got {len(weights)} weights for {len(rewards)} rewards; expected one per reward")
    out = Path(output_dir)
    total = len(rows) if num_rows is None else num_rows
    settings = {
        "rows": total,
        "pairs": pairs,
        "margin": margin,
        "chunk_size": chunk_size,
        "rows_sha256": rows_sha256(rows) if chunks is None else None,
        **(fingerprint or {}),
    }
    restart = "Use a new output_dir, or delete the old one to start over."
    run = Progress(out, settings, OUTPUTS, restart_hint=restart)
    counts = run.state.setdefault("counts", {"pairs": 0, "best": 0, "unscored": 0, "skipped_ties": 0})

    def local_chunks(rows_done: int) -> Iterator[list[tuple[Any, list[Any], list[float | None]]]]:
        for start in range(rows_done, len(rows), chunk_size):
            chunk = list(rows[start : start + chunk_size])
            for k, row in enumerate(chunk):
                problem = row_problem(row, need_responses=generate is None)
                if problem:
                    raise ValueError(f"row {start + k} {problem}")
            prompts = [row["prompt"] for row in chunk]
            if generate is not None:
                responses = generate(prompts, start // chunk_size)
            else:
                responses = [list(row["responses"]) for row in chunk]
            flat_prompts = [p for p, rs in zip(prompts, responses, strict=True) for _ in rs]
            flat = [as_completion(p, r) for p, rs in zip(prompts, responses, strict=True) for r in rs]
            scores = combined_scores(rewards, weights, flat_prompts, flat)
            done, pos = [], 0
            for prompt, rs in zip(prompts, responses, strict=True):
                done.append((prompt, rs, scores[pos : pos + len(rs)]))
                pos += len(rs)
            yield done

    bar = tqdm(total=total, initial=run.rows_done, desc="annotate", unit="row", disable=not progress)
    for chunk in (chunks or local_chunks)(run.rows_done):
        pair_rows, best_rows = [], []
        for prompt, rs, row_scores in chunk:
            counts["unscored"] += sum(s is None for s in row_scores)
            new_pairs, best, tie = select(prompt, rs, row_scores, pairs, margin)
            pair_rows += new_pairs
            counts["skipped_ties"] += tie
            if best is not None:
                best_rows.append(best)
        counts["pairs"] += len(pair_rows)
        counts["best"] += len(best_rows)
        run.commit(
            len(chunk),
            {"pairs.jsonl": _jsonl(pair_rows), "best_of_n.jsonl": _jsonl(best_rows)},
            counts=counts,
        )
        bar.update(len(chunk))
    bar.close()
    if counts["unscored"]:
        logger.warning(
            "%d response(s) got no reward and were left out of pairs and best-of-N", counts["unscored"]
        )
    return AnnotateResult(
        str(out),
        run.rows_done,
        counts["pairs"],
        counts["best"],
        counts["unscored"],
        counts["skipped_ties"],
        counts,
    )


# -- command line ---------------------------------------------------------------------------------------------


def add_annotate_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``annotate`` command to an argparse ``subparsers``; it runs :func:`run_annotate_command`."""
    p = subparsers.add_parser(
        "annotate",
        help="score N responses per prompt; write preference pairs and best-of-N rows (resumable)",
        description=help_text(__doc__.split("\n\n")[0]),
    )
    p.add_argument("input", nargs="?", help="JSONL/JSON/Parquet rows with 'prompt' (and 'responses')")
    p.add_argument("--config", help="YAML file with any of these options (command-line values win)")
    p.add_argument("--output-dir", help="where pairs.jsonl, best_of_n.jsonl and state.json go")
    p.add_argument(
        "--reward",
        action="append",
        dest="rewards",
        type=json_object,
        metavar="JSON",
        help='a reward spec, e.g. \'{"type": "orm", "model": "rh_trl:tiny-rm", "weight": 1}\' (repeat)',
    )
    p.add_argument("--pairs", choices=PAIR_MODES, help="best_worst (default) or all pairs above --margin")
    p.add_argument("--margin", type=float, help="least score difference of a pair (default 0)")
    p.add_argument("--chunk-size", type=int, help="rows per chunk (written and flushed together; default 64)")
    p.add_argument("--policy", help="generate responses with this model (path, hub id or rh_trl:tiny-policy)")
    p.add_argument("--num-samples", type=int, help="responses generated per prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, help="default 256")
    p.add_argument("--temperature", type=float, help="default 1.0")
    p.add_argument("--use-vllm", action="store_true", default=None, help="generate with vLLM")
    p.add_argument("--seed", type=int, help="generation seed (default 0)")
    p.add_argument("--no-progress", action="store_true", default=None, help="hide the progress bar")
    add_ray_arguments(p, "rh-trl annotate")
    p.set_defaults(func=run_annotate_command)
    return p


DEFAULTS: dict[str, Any] = {
    "input": None, "output_dir": None, "rewards": None, "pairs": "best_worst", "margin": 0.0, "chunk_size": 64,
    "policy": None, "num_samples": 4, "max_new_tokens": 256, "temperature": 1.0, "use_vllm": False, "seed": 0,
    "no_progress": False, "ray": False, "ray_address": None, "ray_actors": 2, "ray_actor_options": {},
}  # fmt: skip


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line values over the YAML config's over the defaults; checks the required ones."""
    options = dict(DEFAULTS)
    if getattr(args, "config", None):
        config = read_yaml(args.config, "a YAML mapping of annotate options") or {}
        if not isinstance(config, dict):
            raise ValueError(
                f"{args.config}: expected a YAML mapping of annotate options, got a {type(config).__name__}"
            )
        unknown = sorted(set(config) - set(DEFAULTS))
        if unknown:
            raise ValueError(
                f"{args.config}: unknown option {unknown[0]!r}{did_you_mean(unknown[0], DEFAULTS)}; "
                f"known: {', '.join(sorted(DEFAULTS))}"
            )
        options.update(config)
    options.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    for required in ("input", "output_dir", "rewards"):
        if not options[required]:
            raise ValueError(f"annotate needs '{required}' (on the command line or in --config)")
    return options


def run_annotate_command(args: argparse.Namespace) -> AnnotateResult:
    """Run the ``annotate`` command from parsed arguments."""
    from rh_trl.rewards.factory import build_rewards

    o = resolve_options(args)
    generation = ("num_samples", "max_new_tokens", "temperature", "seed", "use_vllm")
    fingerprint = {
        "rewards": o["rewards"],
        "policy": o["policy"],
        **{key: o[key] if o["policy"] else None for key in generation},
        "input_sha256": file_sha256(o["input"]),
    }
    common = {
        "pairs": o["pairs"], "margin": o["margin"], "chunk_size": o["chunk_size"],
        "progress": not o["no_progress"], "fingerprint": fingerprint,
    }  # fmt: skip
    if o["ray"]:
        if o["policy"]:
            raise ValueError(
                "annotate --ray scores given responses; it does not generate them: run without --ray to "
                "generate with a policy, or give rows with 'responses'"
            )
        from rh_trl.cli.ray_data import RayOptions, annotated_chunks, count_rows

        ray = RayOptions(o["ray_address"], o["ray_actors"], o["ray_actor_options"])
        chunks = annotated_chunks(o["input"], o["rewards"], ray, o["chunk_size"])
        result = annotate(
            [], o["output_dir"], [], chunks=chunks, num_rows=count_rows(o["input"], ray), **common
        )
    else:
        rewards, weights = build_rewards(o["rewards"])
        generate = _policy_generator(o) if o["policy"] else None
        result = annotate(
            read_rows(o["input"]), o["output_dir"], rewards, weights, generate=generate, **common
        )
    print(
        f"annotated {result.rows} rows: {result.pairs} pairs, {result.best} best-of-N rows, "
        f"{result.unscored} responses without reward, {result.skipped_ties} ties -> {result.output_dir}"
    )
    return result


def _policy_generator(o: Mapping[str, Any]) -> Callable[[list[Any], int], list[list[Any]]]:
    if o["use_vllm"]:
        return lambda prompts, chunk: generate_responses_vllm(
            o["policy"],
            prompts,
            o["num_samples"],
            o["max_new_tokens"],
            o["temperature"],
            seed=o["seed"] + chunk,
        )
    from transformers import AutoModelForCausalLM

    from rh_trl.models.loading import load_model, load_tokenizer

    model = load_model(o["policy"], AutoModelForCausalLM)  # a path, a hub id or an offline name
    tokenizer = load_tokenizer(None, model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lambda prompts, chunk: generate_responses(
        model,
        tokenizer,
        prompts,
        o["num_samples"],
        o["max_new_tokens"],
        o["temperature"],
        seed=o["seed"] + chunk,
    )


def main(argv: Sequence[str] | None = None) -> AnnotateResult:
    """``python -m rh_trl.cli.annotate …`` / ``recipes/annotate.py``: the annotate command on its own."""
    parser = argparse.ArgumentParser(prog="annotate")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_annotate_command(subparsers)
    args = parser.parse_args(["annotate", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
