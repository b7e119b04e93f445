"""TRL's colocated vLLM (``GRPOConfig(use_vllm=True, vllm_mode="colocate")``) beside rh_trl's vLLM rewards.

Call :func:`prepare_colocate` with the trainer's config before building the trainer::

    args = GRPOConfig(..., use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3)
    rm = rh_trl.ORM(path, engine="vllm", vllm_kwargs={"gpu_memory_utilization": 0.3})
    prepare_colocate(args)
    trainer = GRPOTrainer(..., reward_funcs=[rm], args=args)

It does two things:

* **The memory split.** TRL's engine takes ``vllm_gpu_memory_utilization`` of the accelerator and each rh_trl
  engine its own ``gpu_memory_utilization``; together they must stay within the whole device, else a clear
  ``ValueError`` names every share, here or when a reward's engine is built later
  (:func:`~rh_trl.engines.vllm_llm.reserve_memory`). rh_trl's engines can
  sleep between scoring calls where vLLM has sleep mode (``enable_sleep_mode=True`` with
  :class:`~rh_trl.callbacks.RewardOffloadCallback`); on CPU sleep mode is refused at construction.
* **TRL's weight sync on vLLM's CPU build.** After loading, vLLM's CPU linear layers hand their weights to a
  prepacked oneDNN (or SGL / zentorch) kernel and replace ``layer.weight`` with an empty parameter that has no
  ``weight_loader`` (``vllm/model_executor/layers/utils.py``, ``dispatch_cpu_unquantized_gemm``; the output
  projection keeps its weight but computes from the prepacked copy). TRL's ``sync_weights`` loads each training
  step's weights through ``model.load_weights`` and fails with ``'Parameter' object has no attribute
  'weight_loader'`` (and a synced output projection would be ignored). :func:`keep_cpu_weights_reloadable`
  makes the linear layers of engines built afterwards in this process compute with ``torch.nn.functional.linear``
  on their own parameters, so loading new weights into them takes effect. This costs the prepacked kernels'
  speed on the policy's engine only: rh_trl's reward engines run in their own processes and keep them. On GPUs
  nothing is changed.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from rh_trl.engines.vllm_llm import import_vllm, reserve_memory

logger = logging.getLogger("rh_trl")


def keep_cpu_weights_reloadable() -> bool:
    """On vLLM's CPU platform, keep the parameters of linear layers built from now on in this process (so that
    ``model.load_weights`` works after loading, as TRL's weight sync needs); returns whether anything changed.

    Idempotent. Layers that are not plain 2-D linear weights (convolutions, MoE experts) keep vLLM's handling.
    """
    import_vllm()
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.model_executor.layers import utils

    dispatch = utils.dispatch_cpu_unquantized_gemm
    if getattr(dispatch, "rh_trl_keeps_weights", False):
        return True

    @functools.wraps(dispatch)
    def keep_weights(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if weight is None or weight.is_meta or weight.ndim != 2:
            dispatch(layer, remove_weight)
            return
        layer.cpu_linear = torch.nn.functional.linear

    keep_weights.rh_trl_keeps_weights = True  # type: ignore[attr-defined]
    utils.dispatch_cpu_unquantized_gemm = keep_weights
    logger.info("vLLM CPU: linear layers keep their weights, so that TRL's weight sync can load new ones")
    return True


def prepare_colocate(args: Any) -> None:
    """Get this process ready for a trainer built with ``args`` whose vLLM runs colocated (``use_vllm=True,
    vllm_mode="colocate"``) beside rh_trl vLLM rewards: check the memory split, and on CPU keep the policy
    engine's weights reloadable. Does nothing for other configs."""
    if not (getattr(args, "use_vllm", False) and getattr(args, "vllm_mode", None) == "colocate"):
        return
    share = float(getattr(args, "vllm_gpu_memory_utilization", 0.0) or 0.0)
    reserve_memory("the trainer's colocated vLLM engine (vllm_gpu_memory_utilization)", share)
    keep_cpu_weights_reloadable()
