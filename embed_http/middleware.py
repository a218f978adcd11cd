"""ASGI middleware around every service: request bodies (media type and size), OpenAI-shaped errors on
the protocol routes, and the optional API key."""

from __future__ import annotations

import hmac
import json
import typing as t

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embed_core.config import setting
from embed_core.table import ServiceSpec
from embed_http.errors import (
    PROTOCOL_PREFIXES,
    STATUS,
    TEI_PATHS,
    error_response,
    openai_error_body,
    refused_key,
    tei_error,
)

JSON_MEDIA_TYPES = ("", "application/json")


class RequestBodies:
    """ASGI middleware for the API routes: a body of another media type than `media_types` gets a 415, a body
    over `max_bytes` a 413, both as JSON and before BentoML reads or parses it. `max_bytes` may be a function of
    the service's settings: it is then read when the server builds its middleware, as the service starts.

    BentoML would otherwise parse form and multipart bodies on the JSON APIs too (a multipart body without
    a boundary escapes its parser as a 500), and it reads a body of any size into memory, a chunked one
    (no Content-Length) included.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: frozenset[str],
        max_bytes: int | t.Callable[[], int],
        media_types: tuple[str, ...] = JSON_MEDIA_TYPES,
    ) -> None:
        self.app = app
        self.routes = routes
        self.max_bytes = max_bytes() if callable(max_bytes) else max_bytes
        self.media_types = media_types

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.routes:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        media_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if media_type not in self.media_types:
            wanted = " or ".join(kind for kind in self.media_types if kind)
            message = f"send the body as {wanted} (Content-Type), not {media_type}"
            await error_response(STATUS["unsupported_media_type"], message)(scope, receive, send)
            return
        too_large = error_response(STATUS["too_large"], f"the request body is larger than {self.max_bytes} bytes")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit():
            if int(declared) > self.max_bytes:
                await too_large(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # No length given (chunked): read the body here, up to the limit, then hand it on.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        handed_on = False

        async def replay() -> t.Any:
            nonlocal handed_on
            if handed_on:
                return await receive()
            handed_on = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


class ProtocolErrors:
    """On /v1/* and /v2/*, an error answer that is not yet OpenAI-shaped (Starlette's plain-text 404 and
    405, BentoML's own errors, the body checks' JSON) is rewritten into `{"error": {...}}`; on TEI's routes,
    into TEI's `{"error", "error_type"}`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(PROTOCOL_PREFIXES):
            shaped, render = already_openai_shaped, openai_answer
        elif scope["path"] in TEI_PATHS:
            shaped, render = already_tei_shaped, tei_error
        else:
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def reshape(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # hold it until the body says whether it needs rewriting
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status, body = start["status"], b"".join(chunks)
            if not shaped(body):
                rewritten = render(status, error_message(body, status))
                extra = [
                    (k, v) for k, v in start.get("headers", []) if k.lower() in (b"www-authenticate", b"retry-after")
                ]
                start = {**start, "headers": rewritten.raw_headers + extra}
                body = rewritten.body
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, reshape)


def openai_answer(status: int, message: str) -> JSONResponse:
    """OpenAI's shape without openai_error's WWW-Authenticate: the reshaped answer keeps the original's header."""
    return JSONResponse(openai_error_body(status, message), status_code=status)


def json_object(body: bytes) -> dict | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def already_tei_shaped(body: bytes) -> bool:
    data = json_object(body)
    return data is not None and isinstance(data.get("error"), str) and "error_type" in data


def already_openai_shaped(body: bytes) -> bool:
    data = json_object(body)
    return data is not None and isinstance(data.get("error"), dict) and "message" in data["error"]


def error_message(body: bytes, status: int) -> str:
    """The message inside an error body of any shape: {"error": str}, {"detail": ...}, or plain text."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    if isinstance(data, dict):
        for key in ("error", "detail", "message"):
            if key in data:
                return data[key] if isinstance(data[key], str) else json.dumps(data[key])
    return json.dumps(data)


# BentoML's own probes and the project's /health stay open, so orchestrators need no key.
OPEN_PATHS = frozenset({"/health", "/livez", "/readyz", "/healthz"})


class ApiKeyAuth:
    """With `EMBED_API_KEY` (or `<NAME>_API_KEY`) set, every other route wants `Authorization: Bearer <key>`.

    The check runs before routing, so a refused request never reaches a model. Keys are compared in
    constant time. CORS preflights (OPTIONS) carry no credentials by design and pass.
    """

    def __init__(self, app: ASGIApp, spec: ServiceSpec) -> None:
        self.app = app
        key = setting(spec, "API_KEY")
        self.key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.key is None
            or scope["type"] not in ("http", "websocket")  # lifespan events
            or scope["path"] in OPEN_PATHS
            or scope.get("method") == "OPTIONS"
            or self.authorized(Headers(scope=scope).get("authorization", ""))
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # none are served today; refuse the handshake all the same
            await send({"type": "websocket.close", "code": 1008})
            return
        await refused_key(scope["path"])(scope, receive, send)  # in the shape of the route's protocol

    def authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        assert self.key is not None
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)
