"""uvicorn's h11 protocol with a deadline for a request's line and headers.

uvicorn times out idle keep-alive connections, but a client that opens a connection and then sends its headers
one byte at a time (or nothing at all) holds it for as long as it likes. Here every request must finish its
request line and headers within ``header_timeout_s`` of the connection opening or of its first byte; a slower
client gets 408 and the connection is closed, with one log line. The body has its own limit in the app
(:func:`rh_trl.serve.body.read_body`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("rh_trl")

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 33\r\nconnection: close\r\n\r\n"
    b"request headers arrived too late\n"
)


def header_timeout_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """An ``H11Protocol`` subclass (uvicorn's ``http=`` setting) that enforces ``header_timeout_s``."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _watch_headers(self) -> None:
            """Armed while the client owes us a request line and headers; disarmed once they are in."""
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_late)
            elif not waiting:
                self._stop_header_timer()

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            if self.timeout_keep_alive_task is not None:
                return  # an idle keep-alive connection: uvicorn's keep-alive timeout closes it
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.info("%s sent no complete request headers within %g s; closing", client, header_timeout_s)
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

    return HeaderTimeoutProtocol
