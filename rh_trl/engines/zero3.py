"""Reward models inside a DeepSpeed ZeRO-3 run: a whole copy per process (the default), or sharded.

While a ZeRO-3 config is active (``accelerate launch`` with a ZeRO-3 DeepSpeed config and ``zero3_init_flag``),
transformers builds and loads every model inside ``deepspeed.zero.Init``, so each process holds only its shard of
the parameters, which are gathered layer by layer during forward passes that every process runs together.

* By default a reward model is loaded whole on every process (:func:`zero3_init_disabled` around its load), so a
  reward scores on its own process like anywhere else; the cost is a full copy per process.
* With ``zero3=True`` (``ORM``, ``PRM``, ``PairwisePM``) it stays sharded: it is loaded inside ``zero.Init`` and, at
  the first trainer call, prepared with TRL's own ``prepare_deepspeed`` (the way TRL prepares its reward and
  reference models). Its forward passes are then collective: the engine runs the same number of micro-batches on
  every process (:class:`~rh_trl.engines.hf.HFEngine` adds empty ones where a process has fewer), so it scores only
  in a trainer's calls, where every process calls it together.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any


def zero3_enabled() -> bool:
    """Whether transformers builds models inside ``zero.Init`` now (an active ZeRO-3 config)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers without the DeepSpeed integration
        return False
    return bool(is_deepspeed_zero3_enabled())


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Within it, transformers builds and loads models whole, even while a ZeRO-3 config is active.

    transformers decides through the ZeRO-3 config it holds (``HfDeepSpeedConfig``); the block detaches it and
    puts it back, so the run's own models, built before and after, are partitioned as configured.
    """
    if not zero3_enabled():
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    held = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = held


def is_partitioned(model: Any) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 shards (built inside ``zero.Init`` or prepared by DeepSpeed)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def parameter_bytes(model: Any) -> tuple[int, int]:
    """``(held here, whole model)``: the bytes of parameters this process holds and those of the whole model."""
    held = whole = 0
    for p in model.parameters():
        size = p.element_size()
        if hasattr(p, "ds_id"):
            held += p.ds_tensor.numel() * size
            whole += p.ds_numel * size
        else:
            held += p.numel() * size
            whole += p.numel() * size
    return held, whole


def prepare_sharded(model: Any) -> Any:
    """``model`` as a ZeRO-3 inference engine of the current run (TRL's ``prepare_deepspeed``), in eval mode.

    The run's DeepSpeed config is used as a trainer has filled it in; values still ``"auto"`` (a run without a
    trainer) become one sample per process and DeepSpeed's defaults.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState
    from trl.models.utils import prepare_deepspeed

    plugin = getattr(AcceleratorState(), "deepspeed_plugin", None)
    config = copy.deepcopy(plugin.deepspeed_config) if plugin is not None else {}
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise RuntimeError(
            "zero3=True shards the reward model with the run's DeepSpeed ZeRO-3 config, but this process has none "
            f"(DeepSpeed stage: {stage}); launch with a ZeRO-3 accelerate config (e.g. configs/accelerate/"
            "cpu_zero3.yaml) or leave zero3 off to keep a whole copy per process"
        )
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    for key, value in (("train_micro_batch_size_per_gpu", 1), ("gradient_accumulation_steps", 1)):
        if config.get(key, "auto") == "auto":
            config[key] = value
    if config.get("train_batch_size", "auto") == "auto":
        config["train_batch_size"] = (
            config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * world
        )
    config = _without_auto(config)
    accelerator = SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config))
    )
    return prepare_deepspeed(model, accelerator)


def _without_auto(config: Any) -> Any:
    """The config without the ``"auto"`` values a trainer would have filled in (DeepSpeed's defaults apply)."""
    if isinstance(config, dict):
        return {k: _without_auto(v) for k, v in config.items() if v != "auto"}
    return config


def check_zero3(zero3: bool, engine: Any) -> None:
    """Refuse ``zero3=True`` for an engine other than transformers (vLLM and servers hold their own weights)."""
    if zero3 and engine != "hf":
        raise ValueError(
            f"zero3=True shards a transformers model with DeepSpeed ZeRO-3, so it needs engine='hf' (got "
            f"engine={engine!r}, which holds its own weights)"
        )
