"""ASGI middleware around every service, for every protocol alike: request bodies (media type and size), the
optional API key, and the error renderer that answers each route in its protocol's shape (asking the registry)."""

from __future__ import annotations

import hmac
import typing as t

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embed_core.config import setting
from embed_core.table import ServiceSpec
from embed_http.errors import KEY_REFUSED, STATUS, error_message, json_object
from embed_http.registry import Routing
from embed_http.seed import SEED

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
            await SEED.error(STATUS["unsupported_media_type"], message)(scope, receive, send)
            return
        too_large = SEED.error(STATUS["too_large"], f"the request body is larger than {self.max_bytes} bytes")
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


PROTOCOL = "embed.protocol"  # the scope key that names the protocol of a request (ProtocolErrors sets it)


class ProtocolErrors:
    """The error renderer: asks the service's Routing which protocol a request belongs to (on a path two protocols
    share, it reads the JSON body, up to `max_bytes`, to tell), names it in the scope, and rewrites an error answer
    that is not yet in that protocol's shape (Starlette's plain-text 404 and 405, BentoML's own errors, the body
    checks' and the API key's) into it. The seed's routes keep their answers as they are."""

    def __init__(self, app: ASGIApp, routing: Routing, max_bytes: int | t.Callable[[], int]) -> None:
        self.app = app
        self.routing = routing
        self.max_bytes = max_bytes() if callable(max_bytes) else max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.routing.is_shared(path) and scope["method"] == "POST":
            body, receive = await peek_body(receive, self.max_bytes)
            protocol = self.routing.protocol_of(path, None if body is None else json_object(body))
        else:
            protocol = self.routing.protocol_of(path)
        scope[PROTOCOL] = protocol.name
        if protocol is SEED:
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
            if not protocol.is_error_shaped(body):
                rewritten = protocol.error(status, error_message(body, status))
                own = {key.lower() for key, _ in rewritten.raw_headers}
                kept = [
                    (key, value)
                    for key, value in start.get("headers", [])
                    if key.lower() in (b"www-authenticate", b"retry-after") and key.lower() not in own
                ]
                start = {**start, "headers": rewritten.raw_headers + kept}
                body = rewritten.body
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, reshape)


async def peek_body(receive: Receive, max_bytes: int) -> tuple[bytes | None, Receive]:
    """Read a request's body, up to `max_bytes`, and a `receive` that hands it on again as it came. The body is
    None when it is larger (RequestBodies refuses it next) or the client left."""
    messages: list[Message] = []
    size = 0
    complete = False
    while not complete and size <= max_bytes:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        complete = not message.get("more_body", False)
    body = b"".join(message.get("body", b"") for message in messages) if complete and size <= max_bytes else None

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return body, replay


class SharedPaths:
    """On a path two protocols share (TEI's /rerank and the seed's), a request ProtocolErrors found to be another
    protocol's than the seed's goes to that protocol's routes instead of the BentoML API that holds the path."""

    def __init__(self, app: ASGIApp, routing: Routing, protocol_app: ASGIApp) -> None:
        self.app = app
        self.routing = routing
        self.protocol_app = protocol_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        shared = scope["type"] == "http" and self.routing.is_shared(scope["path"])
        if shared and scope.get(PROTOCOL, SEED.name) != SEED.name:
            await self.protocol_app(scope, receive, send)
        else:
            await self.app(scope, receive, send)


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
        # In the seed's shape; ProtocolErrors puts it in the shape of the route's protocol.
        await SEED.error(STATUS["unauthorized"], KEY_REFUSED, headers={"WWW-Authenticate": "Bearer"})(
            scope, receive, send
        )

    def authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        assert self.key is not None
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)
