"""What a wire protocol is: an adapter (one module each: seed.py, openai.py, cohere.py, tei.py) that holds its
request models, its routes per service kind, how it reads a request into the runner's call and how it renders
answers and errors. The registry (embed_http/registry.py) lists the adapters; the middleware and the error
renderer ask it which protocol a request belongs to.

A handler is a plain function of the service it runs in (its table row and its runner) and the request; the
routes are built once the service exists (service.py, when the worker has loaded the model), so a handler is
given its runner instead of looking it up at request time.
"""

from __future__ import annotations

import functools
import json
import typing as t
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from embed_core.errors import InputError, Overloaded
from embed_http.errors import STATUS, retry_headers

if t.TYPE_CHECKING:
    from embed_core.table import ServiceSpec


class Served(t.Protocol):
    """The service a route runs in (service.py's classes): its table row and its runner (runners/contract.py)."""

    spec: ServiceSpec
    engine: t.Any


Handler = t.Callable[[Served, Request], t.Awaitable[t.Any]]  # the answer: JSON-ready data, or a Response


@dataclass(frozen=True)
class Endpoint:
    """One route of a protocol."""

    path: str
    method: str
    handler: Handler
    # On a path the seed's API holds too (TEI's /rerank): which JSON bodies are this protocol's, told apart by body.
    claims: t.Callable[[t.Any], bool] | None = None
    # Its OpenAPI operation for GET /docs.json (request body and answers), when the protocol declares it there.
    operation: dict[str, t.Any] | None = None


class Adapter:
    """One wire protocol. Subclasses set `name`, list their `endpoints` per service kind and render errors."""

    name: t.ClassVar[str]
    # Where this protocol answers differently from embed_http/errors.py's STATUS (kind -> status).
    statuses: t.ClassVar[dict[str, int]] = {}
    # Path prefixes whose unknown paths still answer in this protocol's shape (OpenAI's /v1/ 404s).
    namespaces: t.ClassVar[tuple[str, ...]] = ()

    def endpoints(self, kind: str) -> list[Endpoint]:
        return []

    def error(
        self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        raise NotImplementedError

    def is_error_shaped(self, body: bytes) -> bool:
        """Whether an error body is in this protocol's shape already (else the error renderer rewrites it)."""
        raise NotImplementedError

    def status(self, kind: str) -> int:
        return self.statuses.get(kind, STATUS[kind])

    def answer(self, exc: InputError | Overloaded) -> JSONResponse:
        """A runner's or a check's error, in this protocol's shape and status."""
        message = exc.message if isinstance(exc, InputError) else str(exc)
        param = exc.param if isinstance(exc, InputError) else None
        return self.error(self.status(exc.kind), message, param, retry_headers(exc))

    def guarded(self, call: t.Callable[..., t.Awaitable[t.Any]]) -> t.Callable[..., t.Awaitable[t.Any]]:
        """`call`, with the errors of the runners and the checks answered in this protocol's shape."""

        @functools.wraps(call)
        async def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
            try:
                return await call(*args, **kwargs)
            except (InputError, Overloaded) as exc:
                return self.answer(exc)

        return wrapper

    def routes(self, served: Served) -> list[Route]:
        """This protocol's routes for the service's kind, each handler bound to the service (its runner)."""
        return [
            Route(endpoint.path, self._bind(endpoint.handler, served), methods=[endpoint.method])
            for endpoint in self.endpoints(served.spec.kind)
        ]

    def _bind(self, handler: Handler, served: Served) -> t.Callable[[Request], t.Awaitable[Response]]:
        @self.guarded
        async def endpoint(request: Request) -> Response:
            answer = await handler(served, request)
            return answer if isinstance(answer, Response) else JSONResponse(answer)

        return endpoint


async def read_json(request: Request, model: type[BaseModel]) -> t.Any:
    """The body as `model`, or a 400 naming the problem (JSON syntax, then the first wrong field). Its media
    type and size were checked before, as on every route (middleware.RequestBodies)."""
    body = await request.body()
    try:
        data = json.loads(body)
        # JSON may escape a lone surrogate ("\ud800"), which is no Unicode text: refuse it here, as
        # pydantic's parser does on the seed paths, rather than let the tokenizer fail on it.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"the body is not valid JSON text: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise InputError(f"`{param}`: {first['msg']}", param=param) from None
