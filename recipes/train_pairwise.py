"""Train a pairwise preference model with TRL's SFTTrainer; the result loads into ``rh_trl.PairwisePM``.

    python recipes/train_pairwise.py --config configs/pairwise/tiny.yaml
    accelerate launch --config_file configs/accelerate/zero3.yaml recipes/train_pairwise.py --config configs/pairwise/llama3_8b.yaml

A causal LM learns to answer ``A`` or ``B`` to one user turn

    [CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b} \\n

rendered exactly as ``rh_trl.PairwisePM`` renders it at inference by default (layout ``"rh_trl"``: the model's
chat template with its generation prompt, the template's BOS removed, the context flattened by
:func:`rh_trl.rewards.pairwise.flatten_context`). The loss is on the answer token only. The chosen response goes
first in a random half of the pairs (seeded; the answer is the letter where it landed), or both orders are used
(``both_orders: true``). A comparison longer than ``truncation_length`` loses tokens from the
left of its context, never from the responses; one whose responses alone do not fit is left out. Both are
counted and printed. After training, the model and its tokenizer (with the chat template) are saved so that
``rh_trl.PairwisePM(output_dir)`` loads them; the main process then loads the saved model into PairwisePM, prints
its held-out accuracy (both orders averaged, chosen preferred) and writes ``pairwise_summary.json``. LoRA adapters
are merged before saving.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

import rh_trl
from rh_trl.data.evaluation import accuracy_report, reward_accuracy, shorter_reply
from rh_trl.data.preferences import FORMATS, PreferenceDataError, load_pairs, training_and_held_out
from rh_trl.models.loading import prepare_chat_training
from rh_trl.rewards.factory import TINY_PREFIX
from rh_trl.rewards.pairwise import (
    ANSWERS,
    answer_token_ids,
    flatten_context,
    render_comparison,
    response_text,
)
from rh_trl.training.stages import free_memory

logger = logging.getLogger("rh_trl.train_pairwise")

BUILTIN_DATA = "rh_trl:synthetic"
CONTEXT_MARK = "[CONTEXT] "
IGNORE = -100


@dataclass
class PairwiseArguments:
    """What to train on, and how comparisons are built."""

    dataset_path: str = field(
        default=BUILTIN_DATA, metadata={"help": f"a preference file, or '{BUILTIN_DATA}'"}
    )
    dataset_format: str = field(default="auto", metadata={"help": f"one of {FORMATS}"})
    eval_path: str | None = field(
        default=None, metadata={"help": "held-out pairs (default: split from the data)"}
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "share of the data held out when no eval_path"}
    )
    max_pairs: int | None = field(default=None, metadata={"help": "use at most this many training pairs"})
    truncation_length: int = field(
        default=3072,
        metadata={"help": "longest training sequence (answer included), cut from the context's left"},
    )
    both_orders: bool = field(
        default=False, metadata={"help": "train on each pair in both orders instead of one random order"}
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "a Jinja chat template to train and save with (default: the tokenizer's)"},
    )
    skip_invalid_pairs: bool = field(default=False, metadata={"help": "leave out unreadable rows (counted)"})
    tokenizer_name_or_path: str | None = None
    eval_max_length: int | None = field(
        default=None, metadata={"help": "held-out comparisons longer than this are skipped (default: none)"}
    )
    eval_before_training: bool = field(
        default=False, metadata={"help": "also report the held-out accuracy of the model before training"}
    )


# ----------------------------------------------------------------------------------------------------------------
# Comparisons: which response goes first, and the answer
# ----------------------------------------------------------------------------------------------------------------


def order_pairs(
    pairs: Sequence[dict[str, Any]], seed: int, both_orders: bool = False
) -> list[dict[str, Any]]:
    """Comparisons ``{"prompt", "response_a", "response_b", "answer"}`` from ``{"prompt", "chosen", "rejected"}``
    pairs; the answer is the letter where the chosen response landed.

    The chosen response goes first in a random half of the pairs (half rounded up; which ones is shuffled by
    ``random.Random(seed)``), so neither letter is favoured; with ``both_orders`` each pair gives one comparison
    per order.
    """
    first_by_pair = [k < (len(pairs) + 1) // 2 for k in range(len(pairs))]
    random.Random(seed).shuffle(first_by_pair)
    comparisons = []
    for pair, first in zip(pairs, first_by_pair, strict=True):
        chosen, rejected = response_text(pair["chosen"]), response_text(pair["rejected"])
        firsts = (True, False) if both_orders else (first,)
        for chosen_first in firsts:
            a, b = (chosen, rejected) if chosen_first else (rejected, chosen)
            comparisons.append(
                {
                    "prompt": pair["prompt"],
                    "response_a": a,
                    "response_b": b,
                    "answer": "A" if chosen_first else "B",
                }
            )
    return comparisons


# ----------------------------------------------------------------------------------------------------------------
# Rendering and tokenization, as PairwisePM reads a comparison
# ----------------------------------------------------------------------------------------------------------------


def _context_cut(tokenizer: Any, text: str, context: str, excess: int) -> int:
    """How many characters to drop from the left of ``context`` (inside ``text``) to lose ``excess`` tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "cutting a long context from the left needs a fast tokenizer (character offsets); use a fast "
            "tokenizer or raise truncation_length"
        )
    start = text.find(CONTEXT_MARK + context)
    if start < 0:
        raise ValueError(
            "the chat template changes the comparison text, so the context cannot be located for truncation; "
            "raise truncation_length or pass a chat_template that inserts the message content unchanged"
        )
    start += len(CONTEXT_MARK)
    end = start + len(context)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    inside = [e for s, e in offsets if start <= s < e <= end]  # tokens wholly inside the context
    if len(inside) <= excess:
        return len(context)
    return inside[excess - 1] - start


def encode_comparison(
    tokenizer: Any, prompt: Any, response_a: str, response_b: str, max_prompt_tokens: int | None
) -> tuple[list[int] | None, bool]:
    """Token ids of one comparison's prompt, and whether its context was cut from the left to fit
    ``max_prompt_tokens``. ``None`` when the responses alone do not fit."""
    context = flatten_context(prompt)
    cut = 0
    while True:
        text = render_comparison(tokenizer, context[cut:], response_a, response_b)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        excess = 0 if max_prompt_tokens is None else len(ids) - max_prompt_tokens
        if excess <= 0:
            return ids, cut > 0
        if cut >= len(context):
            return None, True
        cut += _context_cut(tokenizer, text, context[cut:], excess)


def tokenize_comparisons(
    comparisons: Sequence[dict[str, Any]], tokenizer: Any, truncation_length: int | None
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """SFT rows ``{"input_ids", "labels"}``: the rendered comparison followed by its answer token, with the loss
    on that token only. Returns the rows and counts ``{"comparisons", "truncated", "too_long", "answer_a"}``.

    Raises :class:`PreferenceDataError` when no comparison is left.
    """
    letters = dict(zip(ANSWERS, answer_token_ids(tokenizer), strict=True))
    budget = None if truncation_length is None else truncation_length - 1
    rows = []
    counts = {"comparisons": 0, "truncated": 0, "too_long": 0, "answer_a": 0}
    for c in comparisons:
        ids, truncated = encode_comparison(tokenizer, c["prompt"], c["response_a"], c["response_b"], budget)
        if ids is None:
            counts["too_long"] += 1
            continue
        counts["truncated"] += truncated
        counts["answer_a"] += c["answer"] == "A"
        answer = letters[c["answer"]]
        rows.append({"input_ids": ids + [answer], "labels": [IGNORE] * len(ids) + [answer]})
    counts["comparisons"] = len(rows)
    if counts["too_long"]:
        logger.warning(
            "left out %d comparison(s) whose two responses alone are longer than truncation_length=%s tokens",
            counts["too_long"],
            truncation_length,
        )
    if not rows:
        raise PreferenceDataError(
            f"no comparisons left to train on: all {len(comparisons)} are longer than truncation_length="
            f"{truncation_length} tokens even with their whole context cut; raise truncation_length"
        )
    return rows, counts


# ----------------------------------------------------------------------------------------------------------------
# Model, data, evaluation
# ----------------------------------------------------------------------------------------------------------------


def load_model_and_tokenizer(
    model_args: ModelConfig, args: PairwiseArguments, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """The causal LM to train: a path / hub id, or a built-in tiny model such as ``rh_trl:tiny-policy``
    (random, offline, for CI)."""
    name = model_args.model_name_or_path
    if name is None:
        raise ValueError("model_name_or_path is required (a causal LM path / hub id, or rh_trl:tiny-policy)")
    if name.startswith(TINY_PREFIX):
        from rh_trl.models.loading import offline_model

        model, tokenizer = offline_model(name)
        if not type(model).__name__.endswith("ForCausalLM"):
            raise ValueError(
                f"'{name}' is a {type(model).__name__}; a pairwise preference model is a causal LM "
                "(e.g. rh_trl:tiny-policy or rh_trl:tiny-lm-chatml)"
            )
    else:
        dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=dtype,
            attn_implementation=model_args.attn_implementation,
            revision=model_args.model_revision,
            trust_remote_code=trust_remote_code,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            args.tokenizer_name_or_path or name, trust_remote_code=trust_remote_code
        )
    prepare_chat_training(
        model, tokenizer, args.chat_template, "PairwisePM renders each comparison with the saved template"
    )
    return model, tokenizer


def load_data(args: PairwiseArguments, seed: int) -> tuple[list[dict], list[dict]]:
    """Training and held-out ``{"prompt", "chosen", "rejected"}`` pairs."""
    if args.dataset_path == BUILTIN_DATA:
        from rh_trl.models.offline import synthetic_preferences

        pairs = load_pairs(synthetic_preferences(96, seed))
    else:
        pairs = load_pairs(args.dataset_path, args.dataset_format, skip_invalid=args.skip_invalid_pairs)
    held_out = (
        load_pairs(args.eval_path, args.dataset_format, skip_invalid=args.skip_invalid_pairs)
        if args.eval_path
        else None
    )
    return training_and_held_out(
        pairs, held_out, eval_fraction=args.eval_fraction, seed=seed, max_pairs=args.max_pairs
    )


def held_out_report(pm: rh_trl.PairwisePM, pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of ``pm`` on pairs (chosen preferred when P(chosen better) > 0.5, a tie counts one half),
    per subset, with the mean P(chosen better); comparisons too long for ``pm`` are counted as skipped."""
    probs = pm.compare_many(
        [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    )
    report = accuracy_report(pairs, probs, [None if p is None else 1.0 - p for p in probs])
    scored = [p for p in probs if p is not None]
    return {
        "accuracy": report["accuracy"],
        "skipped": report["skipped"],
        "subsets": report["subsets"],
        "mean_prob_chosen": sum(scored) / len(scored) if scored else None,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _train_and_save(
    model: Any,
    tokenizer: Any,
    training_args: SFTConfig,
    model_args: ModelConfig,
    train_rows: list[dict],
    eval_rows: list[dict] | None,
) -> tuple[bool, Any]:
    """Train, merge LoRA adapters, save model + tokenizer; returns (is main process, device)."""
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    if hasattr(trainer.model, "merge_and_unload"):
        trainer.model = trainer.model.merge_and_unload()
    trainer.save_model(training_args.output_dir)
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return accelerator.is_main_process, accelerator.device


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = TrlParser((PairwiseArguments, SFTConfig, ModelConfig))
    args, training_args, model_args = parser.parse_args_and_config(argv)
    if args.truncation_length < 2:
        raise ValueError(f"truncation_length must be at least 2 tokens, got {args.truncation_length}")
    # comparisons are cut here, from the left of the context; packed blocks then hold whole comparisons
    training_args.max_length = args.truncation_length if training_args.packing else None
    set_seed(training_args.seed)

    model, tokenizer = load_model_and_tokenizer(model_args, args, training_args.trust_remote_code)
    train_pairs, eval_pairs = load_data(args, training_args.seed)
    train_rows, counts = tokenize_comparisons(
        order_pairs(train_pairs, training_args.seed, args.both_orders), tokenizer, args.truncation_length
    )
    print(
        f"training comparisons: {counts['comparisons']} from {len(train_pairs)} pairs "
        f"({counts['answer_a']} answered A); context cut from the left to {args.truncation_length} tokens: "
        f"{counts['truncated']}; left out, responses alone too long: {counts['too_long']}"
    )
    summary: dict[str, Any] = {
        "train_pairs": len(train_pairs),
        "train_comparisons": counts["comparisons"],
        "answer_a": counts["answer_a"],
        "truncated": counts["truncated"],
        "too_long": counts["too_long"],
        "both_orders": args.both_orders,
        "num_processes": training_args.world_size,
    }
    eval_rows = None
    if eval_pairs and training_args.do_eval:  # the eval loss during training, in one random order
        eval_rows, _ = tokenize_comparisons(
            order_pairs(eval_pairs, training_args.seed + 1), tokenizer, args.truncation_length
        )
    if eval_pairs:
        summary["eval_pairs"] = len(eval_pairs)
        summary["eval_accuracy_shorter_reply"] = reward_accuracy(shorter_reply, eval_pairs)
        if args.eval_before_training:
            untrained = rh_trl.PairwisePM(
                model, tokenizer, max_length=args.eval_max_length, dtype=None, device=training_args.device
            )
            before = held_out_report(untrained, eval_pairs)
            summary["eval_accuracy_before_training"] = before["accuracy"]
            summary["eval_mean_prob_chosen_before_training"] = before["mean_prob_chosen"]
            del untrained

    is_main, device = _train_and_save(model, tokenizer, training_args, model_args, train_rows, eval_rows)
    del model
    free_memory()
    if not is_main:
        return summary

    if eval_pairs:
        pm = rh_trl.PairwisePM(training_args.output_dir, max_length=args.eval_max_length, device=device)
        report = held_out_report(pm, eval_pairs)
        summary.update(
            eval_accuracy=report["accuracy"],
            eval_skipped=report["skipped"],
            eval_mean_prob_chosen=report["mean_prob_chosen"],
            eval_subsets=report["subsets"],
        )
        line = f"held-out accuracy on {len(eval_pairs)} pairs (PairwisePM, both orders): {_fmt(report['accuracy'])}"
        if report["skipped"]:
            line += f" ({report['skipped']} longer than eval_max_length skipped)"
        if "eval_accuracy_before_training" in summary:
            line += f", before training {_fmt(summary['eval_accuracy_before_training'])}"
        print(line + f", shorter final reply wins {_fmt(summary['eval_accuracy_shorter_reply'])}")
    Path(training_args.output_dir, "pairwise_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
