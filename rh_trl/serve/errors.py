"""The refusals the reward server answers with: a status code, a message, and for overload a ``Retry-After``."""

from __future__ import annotations

import math


class RequestError(Exception):
    """A request the server refuses or cannot serve now: HTTP ``status`` and a message saying what was wrong
    and what was expected; ``retry_after`` (seconds) is sent as ``Retry-After`` with 429 and 503 answers."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """``Retry-After`` when set; ``Connection: close`` after a body that was too slow or too large (the rest
        of it is not worth reading)."""
        headers = {"Connection": "close"} if self.status in (408, 413) else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


class ClientGone(Exception):
    """The client closed its connection before the answer was ready; there is nobody to answer."""
