"""A short real GRPO run on CPU, shared by the tests that put a reward into a trainer."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from rh_trl.testing import bundled_prompts

COMMON = {
    "per_device_train_batch_size": 4,
    "max_completion_length": 8,
    "learning_rate": 1e-4,
    "logging_steps": 1,
    "report_to": "none",
    "bf16": False,
    "use_cpu": True,
    "save_strategy": "no",
    "seed": 0,
}


def prompt_dataset(n: int = 16) -> Dataset:
    """The first ``n`` bundled prompts, with a ``topic`` column that rewards must tolerate."""
    rows = bundled_prompts()[:n]
    return Dataset.from_list([{"prompt": r["prompt"], "topic": f"t{i}"} for i, r in enumerate(rows)])


def train_grpo(
    tmp_path: Any,
    policy: Any,
    tokenizer: Any,
    reward_funcs: list[Any],
    *,
    steps: int = 2,
    dataset: Dataset | None = None,
    **overrides: Any,
) -> Any:
    """Train ``policy`` for ``steps`` GRPO steps (groups of 4) and return the trainer."""
    from trl import GRPOConfig, GRPOTrainer

    settings = {**COMMON, "num_generations": 4, **overrides}
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=steps, **settings)
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset if dataset is not None else prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer
