"""Slow clients, vanishing clients, and new connections at shutdown.

- A client that sends its request byte by byte (slowloris) holds a connection, never a model slot (the model only
  sees parsed requests), and is cut off with a 408 once EMBED_READ_TIMEOUT seconds (default 60) pass before its
  headers are complete, and again before its body is.
- A client that disconnects before its answer has its request's task cancelled: its items leave the queue.
- On SIGTERM the listening socket stops accepting at once, while the requests in flight finish.
- A finished request leaves nothing behind: BentoML's request timeout kept its timer armed for the whole timeout
  (600 s), and with it the request's context (its tracing span and more), so memory grew with the request rate.

uvicorn has no timeout for reading a request (its keep-alive timeout runs only between requests) and does not
cancel a request whose client left; BentoML builds uvicorn's settings itself. So both are a small subclass of
uvicorn's httptools protocol (a C parser, a runtime dependency: less CPU per request than h11's), registered
under the name BentoML's settings select ("auto"). BentoML's timeout middleware is replaced by a subclass that
BentoML's app factory finds under the same name.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
from typing import Any

from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from embed_core.config import environ_number

DEFAULT_READ_TIMEOUT = 60.0
# The project's error shape (embed_http/io.py): {"error": what is wrong, for a person to read}.
_TIMEOUT_BODY = json.dumps({"error": "the request was not received in time (EMBED_READ_TIMEOUT)"}).encode()


@functools.cache  # read once per process: every new connection asks for it
def read_timeout() -> float:
    """EMBED_READ_TIMEOUT: seconds a client has to send its headers, and again its body. Refused unless > 0."""
    return environ_number(os.environ, "EMBED_READ_TIMEOUT", DEFAULT_READ_TIMEOUT, parse=float, above=0.0)


def _timeout_response() -> bytes:
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(_TIMEOUT_BODY)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + _TIMEOUT_BODY


class ClientDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with two additions for clients that are slow or gone:

    - a deadline (EMBED_READ_TIMEOUT) for a request's headers, armed when the connection opens or a request
      begins, and again for its body once the headers are in; a late client gets a 408 and is disconnected
      (between requests uvicorn's keep-alive timeout applies);
    - a client that disconnects before its answer is sent has its request's task cancelled, so that its
      items leave the model's queue instead of being computed for nobody (runners/batching.py skips them).
    """

    _read_timer: asyncio.TimerHandle | None = None  # armed while headers or a body are awaited
    _request_task: asyncio.Task | None = None
    _hung_up = False

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # for the headers

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # for the headers

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        self._arm()  # for the body; disarmed at once by on_message_complete when there is none

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()
        # uvicorn stops reading while a large body waits for the app, and reads on only once the answer is sent:
        # a client that left meanwhile went unseen, and its request was computed for nobody. The body is whole
        # now, so read on: what comes next is the client's EOF, or a pipelined request (which uvicorn queues).
        if self.flow is not None:
            self.flow.resume_reading()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self._hung_up = True  # a request whose task has not started yet (request and EOF read at once) skips it
            # Cancelled with it: the app's own task, which BentoML's timeout middleware runs (as the service
            # installs it, TimeoutMiddlewareReleasingTimer below).
            if self._request_task is not None and not self._request_task.done():
                self._request_task.cancel()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        async def tracked(scope: Any, receive: Any, send: Any) -> None:
            if self._hung_up:
                return
            self._request_task = asyncio.current_task()
            try:
                await app(scope, receive, send)
            except asyncio.CancelledError:
                if not self._hung_up:
                    raise  # a shutdown's cancellation, not ours
                # Ours: the client left; nothing to answer, and nothing for uvicorn to log as an app error.

        super()._start_asgi_task(cycle, tracked)

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(read_timeout(), self._late)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _late(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():  # a cancelled timer never runs: this one was still armed
            if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
                self.transport.write(_timeout_response())
            self.transport.close()


def install_header_deadline() -> None:
    """Make uvicorn's "auto" HTTP protocol (the one BentoML's workers use) ClientDeadlineProtocol."""
    from uvicorn import config

    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:ClientDeadlineProtocol"


class TimeoutMiddlewareReleasingTimer(TimeoutMiddleware):
    """BentoML's TimeoutMiddleware (a 504 once the service's traffic timeout passes without an answer starting),
    with two fixes:

    - its timer is cancelled when the request ends. BentoML's never is: the timer and the copy of the request's
      context it holds (the tracing span, its attributes) lived for the whole timeout after every request;
    - when the request's task is cancelled (its client left), so is the app's task, which BentoML's left running.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def send_and_stop_waiting(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        # The app in a task of its own, as BentoML runs it.
        work = asyncio.ensure_future(self.app(scope, receive, send_and_stop_waiting))
        try:
            await waiter
        except asyncio.TimeoutError:
            if work.cancel():
                late = {"error": f"Not able to process the request in {self.timeout} seconds"}
                await JSONResponse(late, status_code=504)(scope, receive, send)
        else:
            await work
        finally:
            timer.cancel()
            if not work.done():  # this request's own task was cancelled (its client left): so is the work
                work.cancel()


def install_timeout_releasing_timer() -> None:
    """Make BentoML build its timeout middleware from the class above (it looks the class up as it builds)."""
    from bentoml._internal.server.http import traffic

    traffic.TimeoutMiddleware = TimeoutMiddlewareReleasingTimer


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
