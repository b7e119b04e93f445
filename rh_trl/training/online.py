"""Helpers shared by the online RLHF recipes: models, prompt datasets, rewards and their callbacks."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datasets import Dataset, load_dataset

from rh_trl.callbacks import RewardNormalizer, RewardOffloadCallback, WithStatistics
from rh_trl.rewards.factory import TINY_PREFIX, build_rewards

logger = logging.getLogger("rh_trl.recipes")

DEFAULT_REWARDS = [{"type": "orm", "model": "rh_trl:tiny-rm", "name": "tiny_rm"}]


@dataclass
class RewardArguments:
    """Rewards (specs for ``rh_trl.rewards.factory.build_rewards``), prompts, and the reward callbacks."""

    rewards: list[dict[str, Any]] = field(
        default_factory=lambda: [dict(s) for s in DEFAULT_REWARDS],
        metadata={"help": "reward specs: [{type: orm, model: ..., weight: 1.0}, ...] (YAML config only)"},
    )
    dataset_path: str | None = field(
        default=None, metadata={"help": "JSONL/JSON/Parquet file with a 'prompt' column (default: bundled)"}
    )
    max_prompts: int | None = field(default=None, metadata={"help": "use at most this many prompts"})
    normalize_rewards: bool = field(default=False, metadata={"help": "whiten each reward by running stats"})
    normalize_clip: float = field(default=5.0, metadata={"help": "clip normalized rewards to ±this"})
    reward_statistics: bool = field(default=True, metadata={"help": "log quantiles, spread, length corr."})
    offload_rewards: bool = field(
        default=False, metadata={"help": "keep reward models off-device between calls"}
    )
    offload_device: str = field(default="cpu", metadata={"help": "'cpu' or 'meta'"})


def load_policy(
    name_or_path: str, dtype: str | None = None, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a path / hub id, or ``rh_trl:tiny-policy`` (offline, random)."""
    if name_or_path.startswith(TINY_PREFIX):
        from rh_trl.models.loading import offline_model

        return offline_model(name_or_path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = dtype if dtype in (None, "auto") else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_prompts(path: str | None, max_rows: int | None = None) -> Dataset:
    """Prompts with a ``prompt`` column from JSONL/JSON/Parquet, or the bundled prompts when ``path`` is None."""
    if path is None:
        from rh_trl.models.offline import bundled_prompts

        dataset = Dataset.from_list(bundled_prompts())
    else:
        suffix = path.rsplit(".", 2)
        kind = "parquet" if path.endswith(".parquet") else "json"
        if kind == "json" and not any(s in ("jsonl", "json") for s in suffix[1:]):
            raise ValueError(f"dataset_path must be a .jsonl, .json or .parquet file, got {path!r}")
        dataset = load_dataset(kind, data_files=path, split="train")
    if "prompt" not in dataset.column_names:
        raise ValueError(
            f"{path or 'the bundled prompts'} has no 'prompt' column (columns: {dataset.column_names})"
        )
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return dataset


def build_reward_functions(args: RewardArguments) -> tuple[list[Any], list[float], list[Any]]:
    """The reward functions to hand the trainer, their weights, and the callbacks that go with them.

    Order of wrapping: offloading acts on the rewards themselves, statistics see the raw values, and
    normalization (outermost) is what the trainer sums.
    """
    rewards, weights = build_rewards(args.rewards)
    callbacks: list[Any] = []
    if args.offload_rewards:
        callbacks.append(RewardOffloadCallback(rewards, offload_device=args.offload_device))
    funcs: list[Any] = [WithStatistics(r) for r in rewards] if args.reward_statistics else rewards
    if args.normalize_rewards:
        normalizer = RewardNormalizer(funcs, clip=args.normalize_clip)
        callbacks.append(normalizer)
        funcs = normalizer.rewards
    return funcs, weights, callbacks


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
