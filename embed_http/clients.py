"""Slow and vanishing clients.

- A client that sends its request byte by byte (slowloris) holds a connection, never a model slot (the model
  only sees parsed requests), and is cut off with a 408 once EMBED_READ_TIMEOUT seconds (default 60) pass
  before its headers are complete, and as long again for its body.
- A client that disconnects while its request waits for the model has its handler cancelled, so the Batcher
  drops its work from the queue instead of computing it for nobody (a batch already running finishes).

uvicorn has no timeout for reading a request (its keep-alive timeout runs only between requests), and BentoML
builds uvicorn's settings itself; so the headers' deadline is a small subclass of uvicorn's h11 protocol,
registered under the name BentoML's settings select ("auto"). The body's deadline and the disconnect watch are
an ASGI middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_READ_TIMEOUT = 60.0
# The project's error shape (embed_http/io.py): {"error": what is wrong, for a person to read}.
_TIMEOUT_BODY = json.dumps({"error": "the request was not received in time (EMBED_READ_TIMEOUT)"}).encode()


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


class HeaderDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request's headers (from the connection's first byte
    or the end of the previous response)."""

    def connection_made(self, transport: Any) -> None:
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_timeout = read_timeout()
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self._header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()  # the next request on a kept-alive connection: its headers get the same deadline
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # between requests, uvicorn's keep-alive timeout applies

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(_timeout_response())
            self.transport.close()


def install_header_deadline() -> None:
    """Make uvicorn's "auto" HTTP protocol (the one BentoML's workers use) the one above."""
    from uvicorn import config

    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:HeaderDeadlineH11Protocol"


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


class VanishingClients:
    """ASGI middleware: a deadline for the request body (408), and a disconnect cancels the request's handler."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.timeout = read_timeout()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        state = {"body_done": False, "late": False, "gone": False, "started": False, "done": False}
        disconnected = asyncio.Event()
        task = asyncio.current_task()
        handler: asyncio.Task | None = None
        watcher: asyncio.Task | None = None

        async def watch() -> None:
            # Once the body is read, the next message uvicorn has is http.disconnect: the client left, or the
            # response is complete.
            # uvicorn may first hand out an empty body chunk left signalled from the body's end: skip it.
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()
            if not state["done"] and handler is not None:
                state["gone"] = True
                handler.cancel()

        async def app_receive() -> dict[str, Any]:
            nonlocal watcher
            if state["body_done"]:
                await disconnected.wait()
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                state["late"] = state["body_done"] = True
                return {"type": "http.disconnect"}
            if message["type"] == "http.disconnect":
                # Gone before its body was read: nothing to answer (BentoML would log a 500 for nobody).
                state["body_done"] = state["gone"] = True
                disconnected.set()
                if handler is not None:
                    handler.cancel()
                    await asyncio.sleep(0)  # the cancellation lands here
            elif not message.get("more_body", False):
                state["body_done"] = True
                watcher = loop.create_task(watch())
            return message

        async def app_send(message: dict[str, Any]) -> None:
            if state["late"]:
                return  # the 408 below answers instead
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True
            await send(message)

        handler = loop.create_task(self.app(scope, app_receive, app_send))
        try:
            await handler
        except asyncio.CancelledError:
            if not state["gone"] or (task is not None and task.cancelling()):
                handler.cancel()
                raise
        except Exception:
            if not state["late"]:
                raise
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        if state["late"] and not state["started"]:
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            await send({"type": "http.response.start", "status": 408, "headers": headers})
            await send({"type": "http.response.body", "body": _TIMEOUT_BODY})
