"""A reward call seen by every process of a trainer.

TRL trainers call each reward on every process with that process's share of the batch, and GRPO and RLOO spread a
prompt's completions over the processes on purpose (``RepeatSampler``), gathering the rewards only afterwards. A
reward that compares a completion with the rest of its group, or logs statistics, needs the other processes'
shares. Each rh_trl reward owns a :class:`RankExchange` for that:

* Only a trainer's calls are exchanged: the call carries ``trainer_state`` (GRPO, RLOO and online DPO pass it) and
  ``torch.distributed`` is initialized with more than one process. Any other call (``reward.score(...)``, a call
  made on one process) is scored by its own process alone, so it never waits for the others.
* Shares travel through the process group's key-value store (the rendezvous store of ``torch.distributed``), not
  through collectives: a process reads only the shares it needs, every wait has a timeout, rewards that run
  concurrently (async rewards) keep their exchanges apart, and the backend may be gloo or NCCL alike.
* Every share is stamped with the reward, its call number and the training step. Processes at different calls or
  steps, a process that fails in its part of a call, and one that never arrives each raise
  :class:`DistributedRewardError` on the processes waiting for it, saying which and why; nothing is scored from
  part of a group.

``RH_TRL_RANK_TIMEOUT_S`` bounds a wait (default: the store's own timeout, the process group's, 30 minutes unless
set at ``init_process_group``).
"""

from __future__ import annotations

import os
import pickle
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from datetime import timedelta
from types import TracebackType
from typing import Any

#: the wait between checks for a failed process while a share is not there yet
POLL_S = 1.0

_names_lock = threading.Lock()
_names_taken: Counter[str] = Counter()
_current: ContextVar[RankCall | None] = ContextVar("rh_trl_rank_call", default=None)


def current_call() -> RankCall | None:
    """The trainer call this code runs in (inside a :class:`RankCall`'s ``with`` block), if any: what an engine whose
    forward passes are collective (a ZeRO-3 sharded model) keeps in step with."""
    return _current.get()


class DistributedRewardError(RuntimeError):
    """The processes of a trainer disagree about a reward call, or one of them failed in it or never came."""


def trainer_world(kwargs: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(rank, world_size)`` when a reward call is a trainer's call on several processes, else ``None``."""
    if "trainer_state" not in kwargs:
        return None
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.get_rank(), dist.get_world_size()


def _default_store() -> Any:
    import torch.distributed as dist

    return dist.PrefixStore("rh_trl", dist.distributed_c10d._get_default_store())


def _timeout(store: Any) -> float:
    configured = os.environ.get("RH_TRL_RANK_TIMEOUT_S")
    if configured:
        return float(configured)
    timeout = getattr(store, "timeout", None)
    return timeout.total_seconds() if isinstance(timeout, timedelta) else 1800.0


class RankExchange:
    """One reward's exchanges with the other processes of a trainer; :meth:`call` opens one call's.

    Args:
        name: the reward's ``__name__``; with ``scope`` (what exchanges: ``"reward"``, or a wrapper's metric
            prefix) it names the reward in errors and its shares in the store, numbered when another exchange of
            this process has the name already (so every process must build its rewards in the same order, as a
            training script does).
        store: a ``torch.distributed`` store (default: the process group's).
    """

    def __init__(self, name: str, scope: str = "reward", store: Any = None) -> None:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{scope}/{name}")
        with _names_lock:  # two rewards given the same name keep their shares apart (numbered in build order)
            _names_taken[base] += 1
            n = _names_taken[base]
        self.name = base if n == 1 else f"{base}#{n}"
        self.display = name if scope == "reward" else f"{scope}/{name}"
        self._store = store
        self._calls = 0
        self._previous_keys: list[str] = []
        #: seconds spent exchanging (publishing, waiting for and reading shares), over every call so far
        self.seconds = 0.0

    def call(self, kwargs: Mapping[str, Any], fingerprint: Any = None) -> RankCall | None:
        """This call's exchange with the other processes, or ``None`` when the call is this process's alone.

        ``fingerprint`` is anything that must be equal on every process (e.g. the grouping settings); a process
        with another one is an error.
        """
        world = trainer_world(kwargs)
        if world is None:
            return None
        if self._store is None:
            self._store = _default_store()
        self._calls += 1
        state = kwargs.get("trainer_state")
        step = getattr(state, "global_step", None)
        return RankCall(self, self._calls, world[0], world[1], (step, fingerprint))

    def _forget(self, keys: list[str]) -> None:
        """Delete this process's shares of the previous call (every process has read them: it has begun this one)
        and remember this call's for the next time."""
        for key in self._previous_keys:
            try:
                self._store.delete_key(key)
            except Exception:  # a store that cannot delete keeps them: a few bytes per call
                break
        self._previous_keys = keys


class RankCall:
    """One reward call across the processes: shares (:meth:`gather`) and failure (``with`` block).

    Use it as a context manager around the process's part of the call: an exception raised inside is published,
    so that the processes waiting for this one raise too instead of waiting for the timeout.
    """

    def __init__(self, exchange: RankExchange, number: int, rank: int, world_size: int, stamp: Any) -> None:
        self.exchange = exchange
        self.number = number
        self.rank = rank
        self.world_size = world_size
        self.stamp = stamp
        self._keys: list[str] = []
        self._full_gathers = 0
        self._phases: Counter[str] = Counter()
        self._token: Any = None

    # -- keys ---------------------------------------------------------------------------------------------------

    @property
    def _store(self) -> Any:
        return self.exchange._store

    def _key(self, phase: str, rank: int) -> str:
        return f"{self.exchange.name}/{self.number}/{phase}/{rank}"

    def _describe(self) -> str:
        step = self.stamp[0]
        return f"{self.exchange.display}: call {self.number}" + (
            f" (step {step})" if step is not None else ""
        )

    def phase(self, name: str) -> str:
        """A phase name not used before in this call (``forwards1``, ``forwards2``, …), for steps a call may take
        several times."""
        self._phases[name] += 1
        return f"{name}{self._phases[name]}"

    # -- sharing ------------------------------------------------------------------------------------------------

    def gather(self, phase: str, value: Any, ranks: Iterable[int] | None = None) -> list[Any]:
        """Publish this process's ``value`` for ``phase`` and return the values of ``ranks`` (default: every
        process), in rank order; this process's own value is not read back."""
        start = time.perf_counter()
        try:
            return self._gather(phase, value, ranks)
        finally:
            self.exchange.seconds += time.perf_counter() - start

    def _gather(self, phase: str, value: Any, ranks: Iterable[int] | None) -> list[Any]:
        key = self._key(phase, self.rank)
        self._store.set(key, pickle.dumps((self.stamp, value), protocol=pickle.HIGHEST_PROTOCOL))
        self._keys.append(key)
        wanted = list(range(self.world_size)) if ranks is None else sorted(set(ranks))
        others = [r for r in wanted if r != self.rank]
        shares = self._read(phase, others)
        if ranks is None:
            self._full_gathers += 1
            if self._full_gathers == 1:
                self.exchange._forget(self._keys)
        by_rank = dict(zip(others, shares, strict=True))
        return [value if r == self.rank else by_rank[r] for r in wanted]

    def _read(self, phase: str, ranks: Sequence[int]) -> list[Any]:
        if not ranks:
            return []
        keys = [self._key(phase, r) for r in ranks]
        self._wait(phase, ranks, keys)
        store = self._store
        raw = store.multi_get(keys) if hasattr(store, "multi_get") else [store.get(k) for k in keys]
        values = []
        for r, data in zip(ranks, raw, strict=True):
            stamp, value = pickle.loads(bytes(data))
            if stamp != self.stamp:
                raise DistributedRewardError(
                    f"{self._describe()}: process {r} is at another call of this reward (its training step and "
                    f"settings {stamp!r}, this process's {self.stamp!r}); every process must make the same reward "
                    "calls in the same order, with the same settings"
                )
            values.append(value)
        return values

    def _wait(self, phase: str, ranks: Sequence[int], keys: list[str]) -> None:
        store = self._store
        timeout = _timeout(store)
        deadline = time.monotonic() + timeout
        while True:
            try:
                store.wait(keys, timedelta(seconds=max(0.001, min(POLL_S, deadline - time.monotonic()))))
                return
            except Exception:  # not there yet: did a process fail, or is time up?
                pass
            self._raise_failures()
            if time.monotonic() >= deadline:
                missing = [r for r, key in zip(ranks, keys, strict=True) if not store.check([key])]
                raise DistributedRewardError(
                    f"{self._describe()}: process(es) {missing} did not reach '{phase}' within {timeout:.0f} s "
                    "(RH_TRL_RANK_TIMEOUT_S). In a trainer, every process calls each reward the same number of "
                    "times, and rh_trl gathers those calls across processes to form whole groups; a call outside "
                    "a trainer (reward.score(...)) is scored by its own process alone"
                )

    # -- failure ------------------------------------------------------------------------------------------------

    def _raise_failures(self) -> None:
        store = self._store
        for r in range(self.world_size):
            key = self._key("failed", r)
            if r != self.rank and store.check([key]):
                message = pickle.loads(bytes(store.get(key)))
                raise DistributedRewardError(f"{self._describe()}: process {r} failed in its part: {message}")

    def __enter__(self) -> RankCall:
        self._token = _current.set(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        _current.reset(self._token)
        if error is not None and not isinstance(error, DistributedRewardError | KeyboardInterrupt):
            key = self._key("failed", self.rank)
            self._store.set(key, pickle.dumps(f"{type(error).__name__}: {error}"))
            self._keys.append(key)


def concatenated(parts: Sequence[Sequence[Any]]) -> tuple[list[Any], list[int]]:
    """The processes' lists joined in rank order, and where each process's part starts."""
    offsets, joined = [], []
    for part in parts:
        offsets.append(len(joined))
        joined.extend(part)
    return joined, offsets
