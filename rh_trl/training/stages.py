"""Running a recipe's training stages: each stage's training arguments, training and saving, freeing memory between
stages."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
from transformers import TrainingArguments


def stage_arguments(
    base: TrainingArguments, cls: type, output_dir: str, overrides: dict[str, Any], **fixed: Any
):
    """``cls`` (a ``TrainingArguments`` class) with ``base``'s values for the fields both have, then the stage's
    ``overrides`` from the config, then ``fixed``."""
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown training argument(s) {unknown} for {cls.__name__}")
    shared = names & {f.name for f in fields(type(base)) if f.init}
    values = {name: getattr(base, name) for name in shared}
    values.update(overrides)
    values.update(output_dir=output_dir, **fixed)
    return cls(**values)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def loss_trend(log_history: list[dict[str, Any]], key: str = "loss") -> dict[str, float]:
    values = [h[key] for h in log_history if key in h]
    return {f"first_{key}": values[0], f"last_{key}": values[-1]} if values else {}


def train_and_save(
    trainer: Any, tokenizer: Any, output_dir: str, loss_keys: Sequence[str] = ("loss",), on_main: Any = None
) -> dict[str, float]:
    """Train, save the model and its tokenizer to ``output_dir`` (``on_main()`` then runs on the main process
    only); returns the first and last logged value of each of ``loss_keys``. The caller frees the memory once
    the trainer is out of scope (:func:`free_memory`)."""
    trainer.train()
    trainer.save_model(output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
        if on_main is not None:
            on_main()
    trainer.accelerator.wait_for_everyone()
    trend = {k: v for key in loss_keys for k, v in loss_trend(trainer.state.log_history, key).items()}
    trainer.accelerator.free_memory()
    return trend
