"""Slow clients, and new connections at shutdown.

- A client that sends its request headers byte by byte (slowloris) holds a connection, never a model slot (the
  model only sees parsed requests), and is cut off with a 408 once EMBED_READ_TIMEOUT seconds (default 60) pass
  before its headers are complete.
- On SIGTERM the listening socket stops accepting at once, while the requests in flight finish.

uvicorn has no timeout for reading a request (its keep-alive timeout runs only between requests), and BentoML
builds uvicorn's settings itself; so the headers' deadline is a small subclass of uvicorn's httptools protocol
(a C parser, a runtime dependency: less CPU per request than h11's), registered under the name BentoML's
settings select ("auto").
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_READ_TIMEOUT = 60.0
# The project's error shape (embed_http/io.py): {"error": what is wrong, for a person to read}.
_TIMEOUT_BODY = json.dumps({"error": "the request was not received in time (EMBED_READ_TIMEOUT)"}).encode()


@functools.cache  # read once per process: every new connection asks for it
def read_timeout() -> float:
    """EMBED_READ_TIMEOUT: seconds a client has to send its headers, and again its body. Refused unless > 0."""
    raw = os.environ.get("EMBED_READ_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_READ_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"EMBED_READ_TIMEOUT must be a number of seconds > 0, got {raw!r}")
    return value


def _timeout_response() -> bytes:
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(_TIMEOUT_BODY)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + _TIMEOUT_BODY


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request's headers: armed when the connection opens
    or a request begins, disarmed once its headers are in (between requests uvicorn's keep-alive timeout applies)."""

    _header_timer: asyncio.TimerHandle | None = None
    _headers_pending = True

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._headers_pending = True
        self._arm()

    def on_headers_complete(self) -> None:
        self._headers_pending = False
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(read_timeout(), self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._headers_pending and not self.transport.is_closing():
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(_timeout_response())
            self.transport.close()


def install_header_deadline() -> None:
    """Make uvicorn's "auto" HTTP protocol (the one BentoML's workers use) the one above."""
    from uvicorn import config

    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:HeaderDeadlineProtocol"


def _stop_listening(fd: int) -> None:
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.shutdown(socket.SHUT_RD)  # on a listening socket (Linux): stop listening; new connections refused
    except OSError:
        pass
    finally:
        sock.close()


def install_refuse_on_shutdown() -> None:
    """On SIGTERM, refuse new connections at once while the requests in flight finish.

    BentoML's arbiter holds the listening socket too, so uvicorn's own shutdown (closing the worker's copy) left
    new connections accepted by the kernel into the backlog, never served, and reset when the server exited.
    shutdown() acts on the socket itself, whichever process holds it. (Each service runs one worker.)"""
    from uvicorn.server import Server

    original = Server.shutdown
    if getattr(original, "refuses_first", False):
        return

    async def shutdown(self: Server, sockets: list[socket.socket] | None = None) -> None:
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                _stop_listening(sock.fileno())
        await original(self, sockets)

    shutdown.refuses_first = True  # type: ignore[attr-defined]
    Server.shutdown = shutdown  # type: ignore[method-assign]
