"""The BentoML services: HTTP and validation, nothing else.

Each row of runners/table.py becomes one BentoML service class here, built from the base class
for its kind, so six services share one pattern:

    bentoml serve service:BgeEmbed --port 6012

Heavy imports (torch, transformers) happen inside each service's __init__.
"""

from __future__ import annotations

import functools
import os
import typing as t

# Before torch is imported (OpenMP reads it once): the model's OpenMP threads sleep when idle instead
# of spinning. They share the cores with this process's event loop (HTTP parsing, JSON); spinning
# threads starved it (bench/cpu_serving.py, 32 clients on 2 cores: 31-68 texts/s and 15-28 CPU ms per
# text with spinning, 129-192 texts/s and 7 CPU ms per text without). Set it in the environment to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import bentoml
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from runners.config import int_setting
from runners.errors import InputError, Overloaded
from runners.table import SERVICES, ServiceSpec

# What require_text / require_texts enforce, declared in the OpenAPI document too (schema only: the
# checks themselves stay in those functions, whose errors name the field at fault).
NonBlankText = t.Annotated[str, Field(json_schema_extra={"minLength": 1, "pattern": r"\S"})]
NonBlankTexts = t.Annotated[list[NonBlankText], Field(json_schema_extra={"minItems": 1})]
# Strict: pydantic would otherwise take true as 1 and "256" or 256.0 as 256.
Dimensions = t.Optional[t.Annotated[int, Field(strict=True)]]


class EmbeddingResponse(BaseModel):
    embedding: list[float]
    dimension: int


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]
    dimension: int


# The body of every error answer: ours ({"error", "param"}) and BentoML's validation 400s ({"error", "detail"}).
ERROR_SCHEMA: dict[str, t.Any] = {
    "type": "object",
    "title": "ErrorResponse",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what is wrong, for a person to read"},
        "param": {"type": "string", "description": "the request field at fault, e.g. `texts[3]`"},
        "detail": {
            "type": "array",
            "items": {"type": "object"},
            "description": "pydantic's list of validation errors (malformed JSON, wrong types, missing fields)",
        },
    },
}
ERROR_ANSWERS: dict[int, str] = {
    400: "Bad input: malformed JSON, a wrong type, a missing field, an empty text, an option out of range",
    413: "More items than the service takes in one request, or a body over <NAME>_MAX_REQUEST_MB",
    415: "The body is not JSON (send Content-Type: application/json)",
    503: "Overloaded: the input does not fit in device memory even alone",
}
JSON_MEDIA_TYPES = ("", "application/json")


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body: dict[str, t.Any] = {"error": message}
    if param is not None:
        body["param"] = param
    return JSONResponse(body, status_code=status)


def json_errors(api: t.Callable[..., t.Awaitable[t.Any]]) -> t.Callable[..., t.Awaitable[t.Any]]:
    """Turn the runners' errors into JSON 4xx/503 answers. (Malformed or wrongly typed JSON never gets
    this far: BentoML's pydantic validation answers it with a 400 and a JSON error.)"""

    @functools.wraps(api)
    async def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        try:
            return await api(*args, **kwargs)
        except InputError as exc:
            return error_response(exc.status, exc.message, exc.param)
        except Overloaded as exc:
            return error_response(503, str(exc))

    return wrapper


def require_text(value: str, name: str) -> str:
    if not value.strip():
        raise InputError(f"`{name}` must be a non-empty string", param=name)
    return value


def require_texts(values: list[str], name: str, limit: int) -> list[str]:
    if not values:
        raise InputError(f"`{name}` must be a non-empty list of strings", param=name)
    if len(values) > limit:
        raise InputError(f"`{name}` holds {len(values)} items; at most {limit} per request", status=413, param=name)
    for index, value in enumerate(values):
        require_text(value, f"{name}[{index}]")
    return values


class ServiceBase:
    """What every service has: its table row, its runner (`engine`) and GET /health."""

    spec: t.ClassVar[ServiceSpec]
    engine: t.Any

    def health(self) -> dict[str, t.Any]:
        return {"status": "ok", "service": self.spec.seed_name, **self.engine.describe()}


class TextEmbedding(ServiceBase):
    def __init__(self) -> None:
        from runners.embedder import TextEmbedder

        self.engine = TextEmbedder(self.spec)

    @bentoml.api(route="/embed/text")
    @json_errors
    async def embed_text(
        self, text: NonBlankText, instruction: t.Optional[str] = None, dimensions: Dimensions = None
    ) -> EmbeddingResponse:
        """Embed one text. Concurrent calls are merged into shared forward passes."""
        [vector] = await self.engine.embed([require_text(text, "text")], instruction, dimensions)
        return EmbeddingResponse(embedding=vector, dimension=len(vector))

    @bentoml.api(route="/embed/texts")
    @json_errors
    async def embed_texts(
        self, texts: NonBlankTexts, instruction: t.Optional[str] = None, dimensions: Dimensions = None
    ) -> EmbeddingsResponse:
        """Embed several texts; the vectors come back in input order."""
        texts = require_texts(texts, "texts", self.engine.config.max_items_per_request)
        vectors = await self.engine.embed(texts, instruction, dimensions)
        return EmbeddingsResponse(embeddings=vectors, dimension=len(vectors[0]))


KIND_BASES: dict[str, type[ServiceBase]] = {"text_embedding": TextEmbedding}


class JsonBodies:
    """ASGI middleware for the JSON APIs: a body that is not JSON gets a 415, a body over `max_bytes` a 413,
    both as JSON and before BentoML reads or parses it.

    BentoML would otherwise parse form and multipart bodies too (a multipart body without a boundary
    escapes its parser as a 500), and it reads a body of any size into memory.
    """

    def __init__(self, app: ASGIApp, routes: frozenset[str], max_bytes: int) -> None:
        self.app = app
        self.routes = routes
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.routes:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        media_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if media_type not in JSON_MEDIA_TYPES:
            message = f"send the body as JSON (Content-Type: application/json), not {media_type}"
            await error_response(415, message)(scope, receive, send)
            return
        too_large = error_response(413, f"the request body is larger than {self.max_bytes} bytes")
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


class DocumentedService(bentoml.Service):
    """A BentoML service whose OpenAPI document (GET /docs.json) declares what its APIs really answer.

    BentoML declares the same three errors for every API, with a `detail` string where its own
    validation 400s send a list, and it drops `null` from optional fields. Here each API route
    declares the error answers it gives (ERROR_ANSWERS, all with ERROR_SCHEMA), and the optional
    fields are `nullable`, as the pydantic signature accepts.
    """

    @property
    def openapi_spec(self) -> t.Any:
        spec = super().openapi_spec
        spec.components["schemas"]["ErrorResponse"] = ERROR_SCHEMA
        error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for api in self.apis.values():
            operation = spec.paths[api.route].post
            for status, description in ERROR_ANSWERS.items():
                operation["responses"][status] = {"description": description, "content": error_content}
            nullable = _nullable_fields(api.input_spec.model_json_schema())
            for media in operation["requestBody"]["content"].values():
                for name, field in (media.schema.properties or {}).items():
                    if name in nullable:
                        field["nullable"] = True
        return spec


def _nullable_fields(schema: dict[str, t.Any]) -> set[str]:
    return {
        name
        for name, field in schema.get("properties", {}).items()
        if any(option.get("type") == "null" for option in field.get("anyOf", []))
    }


async def _health(request: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().health())


def build_service(spec: ServiceSpec) -> t.Any:
    """One BentoML service for one table row: GPU declared, one worker (one copy of the model per GPU)."""

    def check_model_files() -> None:
        """Runs once in `bentoml serve`'s main process, before any worker: a missing or broken model stops
        the server at once with a message naming the variable (a worker failing to load would be respawned
        by BentoML forever)."""
        from runners.config import RunnerConfig
        from runners.loading import check_model_files

        check_model_files(RunnerConfig.from_env(spec))

    namespace = {
        "spec": spec,
        "__module__": __name__,
        "__doc__": spec.title,
        "check_model_files": bentoml.on_deployment(check_model_files),
    }
    inner = type(spec.class_name, (KIND_BASES[spec.kind],), namespace)
    svc = bentoml.service(
        service_class=DocumentedService,
        name=spec.seed_name,
        description=spec.title,
        resources={"gpu": 1},
        workers=1,
        traffic={"timeout": 600},
    )(inner)
    # BentoML's own routes are POST-only; a small mounted app answers GET /health.
    svc.mount_asgi_app(Starlette(routes=[Route("/health", _health, methods=["GET"])]), path="/", name="health")
    # Only the APIs that take JSON (an API with file inputs takes multipart bodies).
    json_routes = frozenset(api.route for api in svc.apis.values() if api.input_spec.mime_type() == "application/json")
    max_bytes = int_setting(spec, "MAX_REQUEST_MB", 32) * 2**20
    svc.add_asgi_middleware(JsonBodies, routes=json_routes, max_bytes=max_bytes)
    return svc


# Module-level names, so that `bentoml serve service:<Class>` finds them.
Qwen3Embed4B = build_service(SERVICES["qwen3_4b_embed"])
BgeEmbed = build_service(SERVICES["bge_embed"])
Qwen3Embed8B = build_service(SERVICES["qwen3_8b_embed"])
