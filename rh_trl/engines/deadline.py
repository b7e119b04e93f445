"""A cooperative deadline for a computation running on one thread.

The reward server wraps each batch in :func:`deadline`; :class:`~rh_trl.engines.hf.HFEngine` calls
:func:`check` before every forward pass, so a batch that runs past its deadline, or that is cancelled because the
server is shutting down, stops at the next forward pass instead of holding the worker until it finishes. Outside
a ``deadline`` block :func:`check` does nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass


class DeadlineExceeded(RuntimeError):
    """The computation ran past its deadline or was cancelled."""


@dataclass
class _Deadline:
    at: float
    seconds: float
    cancelled: threading.Event | None
    what: str


_local = threading.local()


@contextlib.contextmanager
def deadline(
    seconds: float | None, cancelled: threading.Event | None = None, what: str = "the computation"
) -> Iterator[None]:
    """Within this block (on this thread), :func:`check` raises once ``seconds`` have passed or ``cancelled``
    is set."""
    previous = getattr(_local, "deadline", None)
    at = time.monotonic() + seconds if seconds is not None else float("inf")
    _local.deadline = _Deadline(at, seconds if seconds is not None else float("inf"), cancelled, what)
    try:
        yield
    finally:
        _local.deadline = previous


def check() -> None:
    """Raise :class:`DeadlineExceeded` if this thread's computation is past its deadline or cancelled."""
    current: _Deadline | None = getattr(_local, "deadline", None)
    if current is None:
        return
    if current.cancelled is not None and current.cancelled.is_set():
        raise DeadlineExceeded(f"{current.what} was cancelled (the server is shutting down)")
    if time.monotonic() > current.at:
        raise DeadlineExceeded(f"{current.what} ran past its deadline of {current.seconds:g} s")
