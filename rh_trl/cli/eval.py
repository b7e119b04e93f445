"""``rh-trl eval``: accuracy of a reward on chosen/rejected pairs — per subset, RewardBench-style per section,
with a JSON report and a margin plot.

    rh-trl eval --model outputs/bt-minilm-hh --data pairs.jsonl.gz --split held-out --eval-fraction 0.2
    rh-trl eval --baseline shorter --data ../shared/data/llmbar
    rh-trl eval --reward reward.yaml --data prefs.jsonl --output report.json --plot margins.png

``--model`` is a reward-model directory or hub id (its class chosen by ``rh_trl.load``), ``rh_trl:minilm`` (the
pretrained MiniLM encoder with an untrained head: the chance baseline) or ``rh_trl:tiny-rm``; ``--reward`` is a
YAML or JSON file holding one reward spec, e.g. ``{"type": "orm", "model": "rh_trl:tiny-rm", "max_length": 512}``
(see ``rh_trl.rewards.factory``); ``--baseline shorter`` is the "shorter final reply wins" heuristic. ``--data``
takes files (TRL preference, RLHFlow, HH text, LLMBar) or directories of them; each file is a subset named
``<directory>-<file stem>``, or ``<directory>`` when given alone. ``--split held-out`` evaluates on the pairs
that ``recipes/train_bt.py`` held out with the same ``--eval-fraction`` and ``--seed``. ``recipes/eval_rm.py``
runs the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import rh_trl
from rh_trl.cli.parser import help_text
from rh_trl.data.evaluation import accuracy_report, plot_margins, score_pairs, shorter_reply
from rh_trl.data.files import read_yaml
from rh_trl.data.preferences import FORMATS, load_pairs, split_pairs
from rh_trl.models.loading import MINILM, load_model, load_tokenizer, quiet_transformers

DATA_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".parquet")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The evaluation options, shared by ``rh-trl eval`` and ``recipes/eval_rm.py``."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model",
        help="reward-model path / hub id (any family rh_trl.load knows), rh_trl:minilm or rh_trl:tiny-rm",
    )
    which.add_argument("--reward", help="a YAML or JSON file with a reward spec")
    which.add_argument("--baseline", choices=["shorter"], help="a heuristic baseline")
    parser.add_argument("--data", nargs="+", required=True, help="preference files or directories of them")
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--split", default="all", choices=["all", "held-out"])
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-length", type=int, default=None, help="cut long samples from the prompt's left"
    )
    parser.add_argument("--chat-template", default=None, help="'plain' forces the plain text layout")
    parser.add_argument("--skip-invalid", action="store_true", help="leave out unreadable rows (counted)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--output", default=None, help="write the JSON report here")
    parser.add_argument("--plot", default=None, help="write a PNG of the reward-margin distribution here")
    return parser


def add_eval_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` command to an argparse ``subparsers``; it runs :func:`evaluate`."""
    parser = subparsers.add_parser(
        "eval",
        help="accuracy of a reward on chosen/rejected pairs (per subset and section, JSON + PNG)",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=evaluate)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return add_arguments(parser).parse_args(argv)


def data_files(paths: list[str]) -> list[tuple[Path, str]]:
    """(file, subset name) for every data file named or found in a named directory."""
    found: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.name.lower().endswith(DATA_SUFFIXES))
            if not files:
                raise FileNotFoundError(
                    f"no preference files ({', '.join(DATA_SUFFIXES)}) in directory '{path}'"
                )
            found += [(p, f"{path.name}-{p.name.split('.')[0]}") for p in files]
        elif path.exists():
            found.append((path, path.parent.name or path.name.split(".")[0]))
        else:
            raise FileNotFoundError(f"preference data '{path}' does not exist")
    return found


def build(args: argparse.Namespace) -> tuple[Any, str]:
    """The reward to evaluate and a label for it."""
    if args.baseline == "shorter":
        return shorter_reply, "shorter final reply wins"
    if args.reward:
        spec = read_yaml(args.reward, "a YAML or JSON reward spec")
        from rh_trl.rewards.factory import build_reward

        return build_reward(spec), args.reward
    options: dict[str, Any] = {} if args.max_length is None else {"max_length": args.max_length}
    if args.chat_template == "plain":
        options["chat_template"] = False
    if args.model == MINILM:
        import torch
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(args.seed)
        with quiet_transformers():  # the head is left untrained on purpose: no "newly initialized" report
            model = load_model(MINILM, AutoModelForSequenceClassification, num_labels=1)
        return rh_trl.ORM(model, load_tokenizer(MINILM, model), **options), "MiniLM, untrained head"
    return rh_trl.load(args.model, **options), args.model


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Score every pair, print the accuracies and write what was asked for; returns the report."""
    pairs: list[dict[str, Any]] = []
    for path, subset in data_files(args.data):
        pairs += load_pairs(path, args.format, subset=subset, skip_invalid=args.skip_invalid)
    if args.split == "held-out":
        pairs = split_pairs(pairs, args.eval_fraction, args.seed)[1]
    reward, label = build(args)
    chosen, rejected = score_pairs(reward, pairs, args.batch_size)
    report = accuracy_report(pairs, chosen, rejected)
    report["reward"] = label
    print(
        f"{label}: accuracy {report['accuracy']:.4f} on {report['scored']} pairs ({report['skipped']} skipped)"
    )
    for name, sub in report["subsets"].items():
        print(f"  {name:<32} n={sub['n']:<5} accuracy {sub['accuracy']:.4f}")
    for name, score in report["sections"].items():
        print(f"  section {name:<24} {score:.4f}")
    if args.plot and not plot_margins(report["margins"], args.plot, label):
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
    if args.output:
        Path(args.output).write_text(
            json.dumps({k: v for k, v in report.items() if k != "margins"}, indent=2)
        )
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    return evaluate(parse_args(argv))
