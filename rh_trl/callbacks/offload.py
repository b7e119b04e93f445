"""Keep co-located reward models off the accelerator except while they score.

A reward model that lives on the training GPU holds its weights there through the policy's forward pass,
backward pass and optimizer step, although it is only used for a moment per step to score completions.
:class:`RewardOffloadCallback` parks the reward's weights on the host (or as empty ``meta`` placeholders) and
moves them to the scoring device only around each scoring call:

- saves: the reward model's weight (and buffer) memory on the accelerator during the policy's forward,
  backward and optimizer step — often the difference between fitting an 8B RM next to the policy or not;
- costs: one host→device copy of the weights per scoring call (reward weights are frozen, so going back is
  free: the device copy is dropped and the parameters point at the host copy again). With CUDA, the host copy
  is pinned (``pin_memory=True``), which makes that copy faster and asynchronous.

In-process vLLM engines (an engine with ``sleep()`` / ``wake_up()``, e.g. a ``vllm.LLM`` built with
``enable_sleep_mode=True``) are put to sleep between scoring calls instead.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger("rh_trl")


def reward_modules(reward: Any) -> list[torch.nn.Module]:
    """The ``nn.Module`` s a reward scores with: ``.model``, ``.models`` (list/tuple/dict) and ``.engine.model``."""
    found: list[Any] = [getattr(reward, "model", None)]
    models = getattr(reward, "models", None)
    if isinstance(models, dict):
        found.extend(models.values())
    elif isinstance(models, (list, tuple)):
        found.extend(models)
    engine = getattr(reward, "engine", None)
    if engine is not None:
        found.append(getattr(engine, "model", None))
    unique: dict[int, torch.nn.Module] = {}
    for module in found:
        if isinstance(module, torch.nn.Module):
            unique.setdefault(id(module), module)
    return list(unique.values())


def sleepable_engine(reward: Any) -> Any | None:
    """The reward's in-process engine if it can sleep and wake up (``engine`` or ``engine.llm``), else None."""
    engine = getattr(reward, "engine", None)
    for candidate in (engine, getattr(engine, "llm", None)):
        if callable(getattr(candidate, "sleep", None)) and callable(getattr(candidate, "wake_up", None)):
            return candidate
    return None


class _ParkedWeights:
    """Every parameter and buffer of some modules, with a host copy that is the source of truth.

    Reward weights are frozen, so moving them off the device never copies anything back: the modules get
    tensors that view the host copy (or empty ``meta`` placeholders) and the device copy is freed. Tied
    weights stay tied (one tensor per distinct original).
    """

    def __init__(self, modules: Sequence[torch.nn.Module], pin_memory: bool) -> None:
        pin = pin_memory and torch.cuda.is_available()
        self.hosts: dict[
            int, tuple[torch.Tensor, bool]
        ] = {}  # original tensor id -> (host copy, requires_grad)
        self.slots: list[
            tuple[torch.nn.Module, str, int, bool]
        ] = []  # (owner, name, tensor id, is parameter)
        for module in modules:
            for owner in module.modules():
                for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
                    for name, tensor in table.items():
                        if tensor is None:
                            continue
                        if id(tensor) not in self.hosts:
                            self.hosts[id(tensor)] = (self._host(tensor, pin), tensor.requires_grad)
                        self.slots.append((owner, name, id(tensor), is_param))

    @staticmethod
    def _host(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
        if tensor.device.type == "meta":
            raise ValueError("a reward model has weights on the 'meta' device; load it before offloading")
        host = tensor.detach().to("cpu", copy=tensor.device.type != "cpu")
        return host.pin_memory() if pin else host

    def place(self, device: torch.device) -> None:
        """Give every parameter and buffer a copy on ``device`` (a view of the host copy when it is CPU)."""
        values: dict[int, torch.Tensor] = {}
        for key, (host, _requires_grad) in self.hosts.items():
            if device.type == "cpu":
                value = host
            elif device.type == "meta":
                value = torch.empty_like(host, device="meta")
            else:
                value = host.to(device, non_blocking=True)
            values[key] = value
        params: dict[int, torch.nn.Parameter] = {}
        for owner, name, key, is_param in self.slots:
            if is_param:
                if key not in params:
                    params[key] = torch.nn.Parameter(values[key], requires_grad=self.hosts[key][1])
                owner._parameters[name] = params[key]
            else:
                owner._buffers[name] = values[key]

    @property
    def num_bytes(self) -> int:
        return sum(host.numel() * host.element_size() for host, _ in self.hosts.values())


class RewardOffloadCallback(TrainerCallback):
    """Keep the given rewards' models off the training device except while they score.

    Each reward's scoring (its ``compute`` method, which every rh_trl reward has) is wrapped: weights move to
    ``score_device`` right before and are parked on ``offload_device`` right after. Training begins with them
    parked. Rewards without a model (plain functions, remote rewards) are left alone.

        offload = RewardOffloadCallback([orm])
        trainer = GRPOTrainer(..., reward_funcs=[orm, brevity], callbacks=[offload])

    Args:
        rewards: the reward objects whose models to manage.
        score_device: where scoring runs (default: the trainer's device, known at ``on_train_begin``; before
            that, this process's ``cuda:LOCAL_RANK`` or CPU).
        offload_device: where weights wait: ``"cpu"`` (usable on the host) or ``"meta"`` (empty placeholders;
            the host copy is kept privately).
        pin_memory: pin the host copy (CUDA only) so that loading is faster and asynchronous.
        sleep_level: the level passed to a vLLM engine's ``sleep()`` (1 keeps the weights in host memory).
    """

    def __init__(
        self,
        rewards: Iterable[Any],
        score_device: str | torch.device | None = None,
        offload_device: str | torch.device = "cpu",
        pin_memory: bool = True,
        sleep_level: int = 1,
    ) -> None:
        self.score_device = torch.device(score_device) if score_device is not None else None
        self.offload_device = torch.device(offload_device)
        if self.offload_device.type not in ("cpu", "meta"):
            raise ValueError(f"offload_device must be 'cpu' or 'meta', got {offload_device!r}")
        self.sleep_level = sleep_level
        self.pin_memory = pin_memory
        self.rewards: list[Any] = []
        self._parked: dict[int, _ParkedWeights] = {}
        self._engines: dict[int, Any] = {}
        self.loads = 0
        self.seconds_loading = 0.0
        for reward in rewards:
            while getattr(type(reward), "_wraps_reward", False):  # statistics / normalization wrappers
                reward = reward.reward
            modules, engine = reward_modules(reward), sleepable_engine(reward)
            if not modules and engine is None:
                logger.info(
                    "%s has no local model to offload; left alone", getattr(reward, "__name__", reward)
                )
                continue
            if not callable(getattr(reward, "compute", None)):
                raise TypeError(
                    f"{getattr(reward, '__name__', reward)!r} has a model but no compute() method to wrap; "
                    "expected an rh_trl reward"
                )
            if engine is not None:
                self._engines[id(reward)] = engine
            else:
                self._parked[id(reward)] = _ParkedWeights(modules, pin_memory)
            self._wrap(reward)
            self.rewards.append(reward)

    # -- placement --------------------------------------------------------------------------------------------

    def _default_device(self) -> torch.device:
        if torch.cuda.is_available():
            import os

            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    def load(self, reward: Any) -> None:
        """Make ``reward`` ready to score (weights on the scoring device, engine awake)."""
        start = time.perf_counter()
        if id(reward) in self._engines:
            self._engines[id(reward)].wake_up()
        else:
            self._parked[id(reward)].place(self.score_device or self._default_device())
            if torch.cuda.is_available():
                torch.cuda.current_stream().synchronize()
        self.loads += 1
        self.seconds_loading += time.perf_counter() - start

    def offload(self, reward: Any) -> None:
        """Park ``reward``'s weights on the offload device (or put its engine to sleep)."""
        if id(reward) in self._engines:
            self._engines[id(reward)].sleep(level=self.sleep_level)
        else:
            self._parked[id(reward)].place(self.offload_device)

    def offload_all(self) -> None:
        for reward in self.rewards:
            self.offload(reward)

    def _wrap(self, reward: Any) -> None:
        compute = reward.compute

        @functools.wraps(compute)
        def compute_on_device(*args: Any, **kwargs: Any) -> Any:
            self.load(reward)
            try:
                return compute(*args, **kwargs)
            finally:
                self.offload(reward)

        reward.compute = compute_on_device

    # -- trainer events ---------------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.score_device is None:
            self.score_device = torch.device(args.device)
        self.offload_all()
