"""Train a Critique-out-Loud (CLoud) reward model; the result loads into ``rh_trl.CLoud``.

    python recipes/train_cloud.py --config configs/cloud/tiny.yaml
    accelerate launch --config_file configs/accelerate/zero3.yaml recipes/train_cloud.py --config configs/cloud/llama3_8b.yaml

Stages (``stages: [sft, regenerate, joint]``, run in that order; any subset):

1. ``sft`` — critique SFT: the base causal LM learns to write the dataset's (oracle) critiques. Each side of each
   pair is one sequence in CLoud's generation layout: ``prompt + response`` rendered with the chat template, a
   user turn opened with CLoud's preamble (the exact prefix ``rh_trl.CLoud`` generates from), then the critique
   and the end-of-turn token. The loss is on the critique and end-of-turn tokens only. Saved to
   ``sft_model_path`` (default ``<output_dir>/critique_sft``).
2. ``regenerate`` — the SFT model writes its own greedy critique for both sides of every training pair, with the
   generator ``rh_trl.CLoud`` uses at scoring time (batched, with a progress bar; several processes split the
   pairs). These replace the oracle critiques in stage 3, as in the CLoud paper, so the reward head is trained
   on the kind of critique it will read. Written to ``self_critiques_path`` (default
   ``<output_dir>/self_critiques.jsonl``, the input format below, oracle critiques kept as
   ``oracle_chosen_critique``/``oracle_rejected_critique``).
3. ``joint`` — a ``CLoudModel`` (the SFT model plus a new reward head) trained on ``[prompt, response, critique]``
   in exactly the sequence ``rh_trl.CLoud`` scores (``CLoud.layout`` + ``CLoud.score_ids``), with
   ``loss = mean(−log σ(r_chosen − r_rejected)) + lm_weight × LM loss``, where the rewards are read at the
   end-of-turn token closing the critique and the LM loss is the token-mean cross-entropy over the critique and
   end-of-turn tokens of both sides of the batch's pairs (:func:`cloud_loss`). Saved to ``output_dir`` with its
   tokenizer, so ``rh_trl.CLoud(output_dir)`` loads it, generates critiques and scores.

``classic: true`` also trains the classic baseline the paper compares with: the base model with a
sequence-classification head trained by TRL's ``RewardTrainer`` on ``[prompt, response]`` alone (rendered as
``rh_trl.ORM`` scores, long pairs cut from the left), saved to ``classic_output_dir`` (default
``<output_dir>/classic``) for ``rh_trl.ORM``. ``stages: []`` with ``classic: true`` trains only the baseline.

Data: JSONL (or JSON / Parquet) rows ::

    {"prompt": ..., "chosen": ..., "rejected": ..., "chosen_critique": "...", "rejected_critique": "..."}

``prompt``/``chosen``/``rejected`` in any format :mod:`rh_trl.data.preferences` reads (TRL strings or
conversational messages, implicit prompt, HH text); the critiques are strings (a list of strings uses its first,
as the released CLoud datasets store them; other column names via ``chosen_critique_column`` /
``rejected_critique_column``). Critiques are needed for the stages that train on them (``sft``; ``joint`` on
dataset critiques); held-out pairs may have them, which adds the accuracy with oracle critiques to the summary.
``rh_trl:cloud-critiques`` is a small bundled set for CI. Sequences longer than ``truncation_length`` lose tokens
from the left (a leading BOS is kept); a side whose critique alone does not fit leaves its pair out. Both are
counted and printed.

Held-out pairwise accuracy (``rh_trl.CLoud`` from the saved directory: its own critiques, then its head; the same
for the classic baseline through ``rh_trl.ORM``) is printed and written with the run's counts to
``<output_dir>/cloud_summary.json``.

Stages read their inputs from disk, so they can run in separate launches (``--stages sft``, then
``--stages regenerate joint``); a large model is best trained that way, one DeepSpeed engine per process.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainingArguments,
    set_seed,
)
from trl import ModelConfig, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer, TrlParser

import rh_trl
from rh_trl.data.evaluation import accuracy_report, reward_accuracy, score_pairs, shorter_reply
from rh_trl.data.preferences import (
    FORMATS,
    PreferenceDataError,
    tokenize_pairs,
    training_and_held_out,
)
from rh_trl.engines.zero3 import zero3_init_disabled
from rh_trl.formatting import ChatFormatter, to_sample
from rh_trl.models.loading import padding_id, prepare_chat_training, resolve_dtype
from rh_trl.rewards.cloud import CLOUD_PREAMBLE, CLoud, CLoudModel
from rh_trl.rewards.factory import TINY_PREFIX
from rh_trl.training.cloud import (
    BUILTIN_DATA,
    CLoudJointModel,
    CLoudJointTrainer,
    CritiqueRenderer,
    PairCollator,
    has_critiques,
    joint_rows,
    jsonl_row,
    oracle_critique_rewards,
    read_critique_pairs,
    sft_rows,
)
from rh_trl.training.stages import free_memory, stage_arguments, train_and_save

logger = logging.getLogger("rh_trl.train_cloud")

STAGES = ("sft", "regenerate", "joint")
JOINT_CRITIQUES = ("auto", "dataset", "regenerated")


@dataclass
class CLoudArguments:
    """What to train on, which stages to run, and how critiques are laid out."""

    dataset_path: str = field(
        default=BUILTIN_DATA,
        metadata={"help": f"pairs with critiques (JSONL/JSON/Parquet), or '{BUILTIN_DATA}'"},
    )
    dataset_format: str = field(default="auto", metadata={"help": f"one of {FORMATS}"})
    chosen_critique_column: str = "chosen_critique"
    rejected_critique_column: str = "rejected_critique"
    eval_path: str | None = field(
        default=None, metadata={"help": "held-out pairs (default: split from the data)"}
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "share of the data held out when no eval_path"}
    )
    max_pairs: int | None = field(default=None, metadata={"help": "use at most this many training pairs"})
    skip_invalid_pairs: bool = field(default=False, metadata={"help": "leave out unreadable rows (counted)"})
    stages: list[str] = field(
        default_factory=lambda: list(STAGES), metadata={"help": f"stages to run, a subset of {list(STAGES)}"}
    )
    classic: bool = field(default=False, metadata={"help": "also train the classic (no critique) baseline"})
    lm_weight: float = field(
        default=1.25, metadata={"help": "weight of the critique LM loss in the joint stage"}
    )
    joint_critiques: str = field(
        default="auto",
        metadata={"help": "critiques the joint stage trains on: 'dataset', 'regenerated', or 'auto' (regenerated "
        "when the regenerate stage runs)"},
    )  # fmt: skip
    truncation_length: int = field(default=2048, metadata={"help": "longest training sequence, in tokens"})
    max_critique_tokens: int = field(
        default=1024, metadata={"help": "longest generated critique (regenerate stage and evaluation)"}
    )
    generation_batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})
    preamble: str = field(default=CLOUD_PREAMBLE, metadata={"help": "the text that opens the critique turn"})
    chat_template: str | None = field(
        default=None, metadata={"help": "a Jinja template to train and save with"}
    )
    tokenizer_name_or_path: str | None = None
    sft_model_path: str | None = field(
        default=None, metadata={"help": "the critique-SFT model (default: <output_dir>/critique_sft)"}
    )
    self_critiques_path: str | None = field(
        default=None, metadata={"help": "regenerated critiques (default: <output_dir>/self_critiques.jsonl)"}
    )
    classic_output_dir: str | None = field(default=None, metadata={"help": "default: <output_dir>/classic"})
    sft_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "training arguments that differ in the sft stage (YAML only)"}
    )
    joint_args: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "training arguments that differ in the joint stage (YAML only)"},
    )
    classic_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "training arguments that differ for the classic baseline"}
    )


# ----------------------------------------------------------------------------------------------------------------
# Models and per-stage training arguments
# ----------------------------------------------------------------------------------------------------------------


def load_causal_lm(
    name: str, model_args: ModelConfig, args: CLoudArguments, tokenizer_name: str | None = None
) -> tuple[Any, Any]:
    """A causal LM and its tokenizer (with a chat template and a pad token) from a path / hub id, or a built-in
    tiny model such as ``rh_trl:tiny-lm-chatml`` (random, offline, for CI)."""
    if name.startswith(TINY_PREFIX):
        from rh_trl.models.loading import offline_model

        model, tokenizer = offline_model(name)
        if not type(model).__name__.endswith("ForCausalLM"):
            raise ValueError(
                f"'{name}' is a {type(model).__name__}; CLoud trains a causal LM (e.g. rh_trl:tiny-lm-chatml)"
            )
    else:
        kwargs: dict[str, Any] = {}
        if model_args.dtype is not None:
            kwargs["dtype"] = resolve_dtype(model_args.dtype)
        if model_args.attn_implementation:
            kwargs["attn_implementation"] = model_args.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or name)
    prepare_chat_training(model, tokenizer, args.chat_template, "CLoud renders critiques with it")
    return model, tokenizer


def classifier_from_causal_lm(lm: Any) -> Any:
    """A one-output sequence classifier sharing ``lm``'s backbone weights, with a new head."""
    config = type(lm.config).from_dict(lm.config.to_dict())
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    getattr(model, model.base_model_prefix).load_state_dict(lm.get_decoder().state_dict())
    return model.to(lm.dtype)


def load_classifier(model_args: ModelConfig, args: CLoudArguments) -> tuple[Any, Any]:
    """The classic baseline's model: the base LM's backbone with a one-output sequence-classification head."""
    name = model_args.model_name_or_path
    if name.startswith(TINY_PREFIX):
        lm, tokenizer = load_causal_lm(name, model_args, args)
        return classifier_from_causal_lm(lm), tokenizer
    kwargs: dict[str, Any] = {"num_labels": 1}
    if model_args.dtype is not None:
        kwargs["dtype"] = resolve_dtype(model_args.dtype)
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    model = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path or name)
    if args.chat_template:
        tokenizer.chat_template = args.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------


def run_sft(
    args: CLoudArguments, base: RewardConfig, model_args: ModelConfig, pairs: list[dict], sft_path: str
) -> dict[str, Any]:
    """Stage 1: critique SFT of the base LM; saves the LM and its tokenizer to ``sft_path``."""
    training_args = stage_arguments(base, SFTConfig, sft_path, args.sft_args, max_length=None, packing=False)
    set_seed(training_args.seed)
    model, tokenizer = load_causal_lm(
        model_args.model_name_or_path, model_args, args, args.tokenizer_name_or_path
    )
    rows, counts = sft_rows(pairs, CritiqueRenderer(tokenizer, args.preamble), args.truncation_length)
    print(
        f"critique SFT: {counts['sequences']} sequences from {len(pairs)} pairs; cut from the left to "
        f"{args.truncation_length} tokens: {counts['truncated']}; left out, critique too long: {counts['too_long']}"
    )
    trainer = SFTTrainer(
        model=model, args=training_args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    del model
    return {**counts, "path": sft_path, **train_and_save(trainer, tokenizer, sft_path)}


def run_regenerate(
    args: CLoudArguments,
    model_args: ModelConfig,
    pairs: list[dict],
    sft_path: str,
    out_path: str,
    device: Any,
) -> tuple[list[dict], dict[str, Any]]:
    """Stage 2: the SFT model's greedy critique for both sides of every pair, generated by ``rh_trl.CLoud``'s own
    generator; the processes split the pairs. Returns the pairs with these critiques and the counts."""
    state = PartialState()
    with zero3_init_disabled():
        lm, tokenizer = load_causal_lm(sft_path, model_args, args)
    generator = CLoud(
        CLoudModel.from_causal_lm(lm),
        tokenizer,
        name="critique_sft",
        preamble=args.preamble,
        max_new_tokens=args.max_critique_tokens,
        batch_size=args.generation_batch_size,
        device=device,
        dtype=None,
        progress=state.is_local_main_process,
    )
    with state.split_between_processes(list(range(len(pairs)))) as mine:
        samples = [
            to_sample(pairs[i]["prompt"], pairs[i][side]) for i in mine for side in ("chosen", "rejected")
        ]
        layouts = [generator.layout(s.prompt, s.response) for s in samples]
        texts, counts = generator.critiques(samples, layouts) if samples else ([], {})
        local = [(i, texts[2 * k], texts[2 * k + 1]) for k, i in enumerate(mine)]
    results = sorted(gather_object(local))
    totals: defaultdict[str, int] = defaultdict(int)
    for c in gather_object([counts]):
        for key, value in c.items():
            totals[key] += value
    regenerated, failed, empty = [], 0, 0
    for i, chosen, rejected in results:
        if chosen is None or rejected is None:
            failed += 1
            continue
        pair = {k: v for k, v in pairs[i].items() if not k.endswith("_critique")}
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            empty += not text
            pair[f"{side}_critique"] = text
            if f"{side}_critique" in pairs[i]:
                pair[f"oracle_{side}_critique"] = pairs[i][f"{side}_critique"]
        regenerated.append(pair)
    result = {
        "pairs": len(regenerated),
        "failed": failed,
        "empty_critiques": empty,
        "truncated_critiques": totals["critique_truncated"],
        "path": out_path,
    }
    if failed:
        logger.error("regenerate: %d pair(s) without a critique were left out", failed)
    if state.is_main_process:
        print(
            f"regenerated critiques for {len(regenerated)} pairs with {sft_path}: cut at {args.max_critique_tokens} "
            f"tokens: {result['truncated_critiques']}, empty: {empty}, failed: {failed}"
        )
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as f:
            for pair in regenerated:
                f.write(json.dumps(jsonl_row(pair)) + "\n")
    state.wait_for_everyone()
    del generator, lm
    free_memory()
    if not regenerated:
        raise PreferenceDataError("the regenerate stage produced no critiques; see the errors above")
    return regenerated, result


def run_joint(
    args: CLoudArguments, base: RewardConfig, model_args: ModelConfig, pairs: list[dict], init_path: str
) -> dict[str, Any]:
    """Stage 3: BT + LM training of a CLoudModel built on the SFT model; saves it and its tokenizer."""
    output_dir = base.output_dir
    training_args = stage_arguments(
        base, TrainingArguments, output_dir, args.joint_args, remove_unused_columns=False
    )
    set_seed(training_args.seed)  # the new reward head's initialization is part of the run
    lm, tokenizer = load_causal_lm(init_path, model_args, args)
    rows, counts = joint_rows(pairs, CritiqueRenderer(tokenizer, args.preamble), args.truncation_length)
    print(
        f"joint training: {counts['pairs']} pairs; sides cut from the left to {args.truncation_length} tokens: "
        f"{counts['truncated']}; pairs left out, critique too long: {counts['too_long']}; lm_weight {args.lm_weight}"
    )
    model = CLoudJointModel.from_causal_lm(lm)
    trainer = CLoudJointTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(rows),
        data_collator=PairCollator(padding_id(tokenizer)),
        processing_class=tokenizer,
        lm_weight=args.lm_weight,
    )
    del model, lm

    def save_as_cloud_model() -> None:  # the config names the class rh_trl.CLoud loads
        config_path = Path(output_dir, "config.json")
        config = json.loads(config_path.read_text())
        config["architectures"] = [CLoudModel.__name__]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    losses = ("loss", "bt_loss", "lm_loss")
    return {**counts, **train_and_save(trainer, tokenizer, output_dir, losses, save_as_cloud_model)}


def run_classic(
    args: CLoudArguments, base: RewardConfig, model_args: ModelConfig, pairs: list[dict], output_dir: str
) -> dict[str, Any]:
    """The classic baseline: BT on ``[prompt, response]`` with TRL's RewardTrainer; saved for ``rh_trl.ORM``."""
    training_args = stage_arguments(base, RewardConfig, output_dir, args.classic_args, max_length=None)
    set_seed(training_args.seed)
    model, tokenizer = load_classifier(model_args, args)
    formatter = ChatFormatter(tokenizer, max_length=args.truncation_length)
    rows, counts = tokenize_pairs(pairs, formatter)
    print(
        f"classic baseline: {counts['pairs']} pairs; sides cut from the left to {args.truncation_length} tokens: "
        f"{counts['truncated']}"
    )
    trainer = RewardTrainer(
        model=model, args=training_args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    del model
    return {**counts, "path": output_dir, **train_and_save(trainer, tokenizer, output_dir)}


# ----------------------------------------------------------------------------------------------------------------
# Held-out accuracy
# ----------------------------------------------------------------------------------------------------------------


def evaluate_cloud(
    path: str, pairs: list[dict], args: CLoudArguments, model_args: ModelConfig, device: Any
) -> dict[str, Any]:
    """Held-out accuracy of the saved CLoud model (its own critiques, then its head), and with oracle critiques
    where every held-out pair has them."""
    with zero3_init_disabled():
        reward = rh_trl.CLoud(
            path,
            name="cloud_eval",
            preamble=args.preamble,
            max_new_tokens=args.max_critique_tokens,
            batch_size=args.generation_batch_size,
            device=device,
            dtype=model_args.dtype or "auto",
            progress=True,
        )
    chosen, rejected = score_pairs(reward, pairs, batch_size=256, progress=False)
    report = accuracy_report(pairs, chosen, rejected)
    result: dict[str, Any] = {
        "accuracy": report["accuracy"],
        "skipped": report["skipped"],
        "subsets": report["subsets"],
    }
    if all(has_critiques(p) for p in pairs):
        oracle = accuracy_report(pairs, *oracle_critique_rewards(reward, pairs))
        result["accuracy_oracle_critiques"] = oracle["accuracy"]
    del reward
    free_memory()
    return result


def evaluate_classic(
    path: str, pairs: list[dict], args: CLoudArguments, model_args: ModelConfig, device: Any
) -> float:
    with zero3_init_disabled():
        reward = rh_trl.ORM(
            path,
            max_length=args.truncation_length,
            device=device,
            dtype=model_args.dtype or "auto",
            normalize=False,
        )
    accuracy = reward_accuracy(reward, pairs)
    del reward
    free_memory()
    return accuracy


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def check_stages(stages: Sequence[str], classic: bool) -> list[str]:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; expected a subset of {list(STAGES)}")
    if len(set(stages)) != len(stages) or list(stages) != [s for s in STAGES if s in stages]:
        raise ValueError(f"stages must be listed once each, in the order {list(STAGES)}; got {list(stages)}")
    if not stages and not classic:
        raise ValueError("nothing to train: stages is empty and classic is false")
    return list(stages)


def joint_source(args: CLoudArguments, stages: Sequence[str]) -> str | None:
    """Where the joint stage's critiques come from: 'dataset', 'regenerated', or None (no joint stage)."""
    if args.joint_critiques not in JOINT_CRITIQUES:
        raise ValueError(f"joint_critiques must be one of {JOINT_CRITIQUES}, got '{args.joint_critiques}'")
    if "joint" not in stages:
        return None
    if args.joint_critiques == "auto":
        return "regenerated" if "regenerate" in stages else "dataset"
    return args.joint_critiques


def load_data(args: CLoudArguments, require_critiques: bool, seed: int) -> tuple[list[dict], list[dict]]:
    """Training and held-out pairs (held-out critiques are optional)."""
    columns = (args.chosen_critique_column, args.rejected_critique_column)
    pairs = read_critique_pairs(
        args.dataset_path, args.dataset_format, columns, require_critiques, args.skip_invalid_pairs
    )
    held_out = (
        read_critique_pairs(args.eval_path, args.dataset_format, columns, False, args.skip_invalid_pairs)
        if args.eval_path
        else None
    )
    return training_and_held_out(
        pairs, held_out, eval_fraction=args.eval_fraction, seed=seed, max_pairs=args.max_pairs
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = TrlParser((CLoudArguments, RewardConfig, ModelConfig))
    args, training_args, model_args = parser.parse_args_and_config(argv)
    stages = check_stages(args.stages, args.classic)
    source = joint_source(args, stages)
    if model_args.use_peft:
        raise ValueError("this recipe trains full models; LoRA (use_peft) is not supported")
    if args.lm_weight < 0:
        raise ValueError(f"lm_weight must be at least 0, got {args.lm_weight}")
    if model_args.model_name_or_path is None and ("sft" in stages or args.classic):
        raise ValueError("model_name_or_path is required (the base causal LM, or rh_trl:tiny-lm-chatml)")
    output_dir = training_args.output_dir
    sft_path = args.sft_model_path or str(Path(output_dir) / "critique_sft")
    self_path = args.self_critiques_path or str(Path(output_dir) / "self_critiques.jsonl")
    classic_dir = args.classic_output_dir or str(Path(output_dir) / "classic")
    needs_sft_model = "regenerate" in stages or "joint" in stages
    if (
        needs_sft_model
        and "sft" not in stages
        and args.sft_model_path is None
        and not Path(sft_path).exists()
    ):
        raise FileNotFoundError(
            f"the regenerate and joint stages start from the critique-SFT model, and {sft_path} does not exist: "
            "run stage 'sft' first or set sft_model_path"
        )
    if source == "regenerated" and "regenerate" not in stages and not Path(self_path).exists():
        raise FileNotFoundError(
            f"joint_critiques is 'regenerated' but {self_path} does not exist: run stage 'regenerate' first or set "
            "self_critiques_path"
        )

    train_pairs, eval_pairs = load_data(args, "sft" in stages or source == "dataset", training_args.seed)
    summary: dict[str, Any] = {
        "stages": stages,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
    }
    if eval_pairs:
        summary["eval_accuracy_shorter_reply"] = reward_accuracy(shorter_reply, eval_pairs)
    device = training_args.device
    state = PartialState()

    if "sft" in stages:
        summary["sft"] = run_sft(args, training_args, model_args, train_pairs, sft_path)
        free_memory()
    joint_pairs = train_pairs
    if "regenerate" in stages:
        joint_pairs, summary["regenerate"] = run_regenerate(
            args, model_args, train_pairs, sft_path, self_path, device
        )
    elif source == "regenerated":
        joint_pairs = read_critique_pairs(self_path)
    if "joint" in stages:
        summary["joint"] = run_joint(args, training_args, model_args, joint_pairs, sft_path)
        summary["joint"]["critiques"] = source
        free_memory()
    if args.classic:
        summary["classic"] = run_classic(args, training_args, model_args, train_pairs, classic_dir)
        free_memory()
    if not state.is_main_process:  # held-out evaluation runs in the main process, after all training
        return summary

    if eval_pairs and "joint" in stages:
        held_out = evaluate_cloud(output_dir, eval_pairs, args, model_args, device)
        summary["eval_accuracy"] = held_out.pop("accuracy")
        summary["eval"] = held_out
    if eval_pairs and args.classic:
        summary["classic_eval_accuracy"] = evaluate_classic(classic_dir, eval_pairs, args, model_args, device)
    if eval_pairs:
        parts = [f"shorter reply {summary['eval_accuracy_shorter_reply']:.4f}"]
        if "classic_eval_accuracy" in summary:
            parts.insert(0, f"classic {summary['classic_eval_accuracy']:.4f}")
        if "eval" in summary and "accuracy_oracle_critiques" in summary["eval"]:
            parts.insert(0, f"CLoud with oracle critiques {summary['eval']['accuracy_oracle_critiques']:.4f}")
        if "eval_accuracy" in summary:
            parts.insert(0, f"CLoud {summary['eval_accuracy']:.4f}")
        print(f"held-out accuracy on {len(eval_pairs)} pairs: " + ", ".join(parts))
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    Path(output_dir, "cloud_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
