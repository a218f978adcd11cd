"""What the services share about HTTP: request field types, answer models, error answers, the image
APIs' form-or-JSON input, the request-body middleware, the OpenAPI document and tracing.

service.py builds the services from these; nothing here loads a model or knows one.
"""

from __future__ import annotations

import functools
import typing as t

import bentoml
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from runners.errors import InputError, Overloaded
from runners.images import ImageSettings

# What require_text / require_texts enforce, declared in the OpenAPI document too (schema only: the
# checks themselves stay in those functions, whose errors name the field at fault).
NonBlankText = t.Annotated[str, Field(json_schema_extra={"minLength": 1, "pattern": r"\S"})]
NonBlankTexts = t.Annotated[list[NonBlankText], Field(json_schema_extra={"minItems": 1})]
# Strict: pydantic would otherwise take true as 1 and "256" or 256.0 as 256.
Dimensions = t.Optional[t.Annotated[int, Field(strict=True)]]
# The same for top_k (true would be top_k=1) and return_documents ("no" or 0 would be false).
TopK = t.Optional[t.Annotated[int, Field(strict=True, json_schema_extra={"minimum": 1})]]
Flag = t.Annotated[bool, Field(strict=True)]
# Rerank documents may be empty strings: an empty caption is still a document, and is scored.
Documents = t.Annotated[list[str], Field(json_schema_extra={"minItems": 1})]


class EmbeddingResponse(BaseModel):
    embedding: list[float]
    dimension: int


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]
    dimension: int


class RerankResult(BaseModel):
    original_index: int
    score: float
    # Left out of the JSON (not null) when the request says return_documents=false.
    document: t.Optional[str] = Field(default=None, exclude_if=lambda value: value is None)


class RerankResponse(BaseModel):
    results: list[RerankResult]


class ScoreResponse(BaseModel):
    score: float


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
    415: "The body is not JSON (send Content-Type: application/json), nor a form where the API takes one",
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
            for value in kwargs.values():
                if isinstance(value, Rejected):  # a form body that could not be read at all (see FormOrJSON)
                    raise value.error
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


def require_items(values: list[str], name: str, limit: int) -> list[str]:
    """A non-empty list of at most `limit` strings (which may be blank: rerank documents)."""
    if not values:
        raise InputError(f"`{name}` must be a non-empty list of strings", param=name)
    if len(values) > limit:
        raise InputError(f"`{name}` holds {len(values)} items; at most {limit} per request", status=413, param=name)
    return values


def require_texts(values: list[str], name: str, limit: int) -> list[str]:
    for index, value in enumerate(require_items(values, name, limit)):
        require_text(value, f"{name}[{index}]")
    return values


# -- image embedding: the same fields as JSON (images in base64) or as a multipart form (files) --------


class Rejected:
    """Stands in for every field of a form body that could not be parsed; json_errors raises its error."""

    def __init__(self, error: InputError) -> None:
        self.error = error


# In a multipart form an image is a file part; in JSON it is base64 or a data: URI.
UploadedFile = t.Annotated[UploadFile, WithJsonSchema({"type": "string", "format": "binary"})]
ImageField = t.Union[str, UploadedFile]
ImageFields = t.Annotated[list[ImageField], Field(json_schema_extra={"minItems": 1})]
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class FormOrJSON(bentoml.IODescriptor):
    """An API input that reads the same field names from a JSON body or from a form.

    BentoML picks one of the two by the endpoint's declared types; an image endpoint must take both,
    so this input model parses forms itself and hands JSON to BentoML's own parser (whose malformed-JSON
    and wrong-type answers stay 400 with a JSON body).
    """

    # A misspelt field is refused, not dropped (in JSON by pydantic, in a form below).
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    @classmethod
    async def from_http_request(cls, request: Request, serde: t.Any) -> t.Any:
        # The body's media type and size were checked before (RequestBodies, with image_request_limits).
        limits = bentoml.get_current_service().request_limits()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in FORM_TYPES:
            return await super().from_http_request(request, serde)
        try:
            form = await request.form(max_part_size=limits["form_field"])
        except (MultiPartException, HTTPException) as exc:  # Starlette re-raises parser errors as a 400 HTTPException
            return cls._rejected(InputError(f"the form could not be read: {getattr(exc, 'detail', exc)}"))
        unknown = sorted(set(form.keys()) - set(cls.model_fields))
        if unknown:
            expected = ", ".join(f"`{name}`" for name in cls.model_fields)
            return cls._rejected(
                InputError(f"unknown form field `{unknown[0]}`; this API takes {expected}", param=unknown[0])
            )
        data: dict[str, t.Any] = {}
        for name, field in cls.model_fields.items():
            values = form.getlist(name)
            if values:
                is_list = t.get_origin(field.annotation) is list
                data[name] = values if is_list or len(values) > 1 else values[0]
        return cls.model_validate(data)

    @classmethod
    def _rejected(cls, error: InputError) -> t.Any:
        return cls.model_construct(**{name: Rejected(error) for name in cls.model_fields})


class ImageInput(FormOrJSON):
    image: ImageField


class ImagesInput(FormOrJSON):
    images: ImageFields


class SimilarityInput(FormOrJSON):
    text: NonBlankText
    images: ImageFields


class Score(BaseModel):
    index: int  # position of the image in the request
    score: float  # sigmoid(cosine * scale + bias): SigLIP's probability that text and image match
    cosine: float


class SimilarityResponse(BaseModel):
    scores: list[Score]  # in input order
    scale: float
    bias: float


def image_request_limits(settings: ImageSettings) -> dict[str, int]:
    """Body and form-field sizes that can hold the allowed images (base64 is 4/3 of the bytes)."""
    encoded = settings.limits.max_bytes * 4 // 3 + 1024
    return {"form_field": encoded, "body": settings.max_images_per_request * encoded + 1024 * 1024}


async def read_image_field(value: t.Any, name: str, max_bytes: int) -> bytes | str:
    """A file part becomes its bytes (read no further than the limit); base64 text is passed on as text."""
    if isinstance(value, str):
        return value
    data = await value.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"`{name}` is over {max_bytes} bytes; at most {max_bytes} per image", status=413, param=name)
    if not data:
        raise InputError(f"`{name}` is an empty upload", param=name)
    return data


class RequestBodies:
    """ASGI middleware for the API routes: a body of another media type than `media_types` gets a 415, a body
    over `max_bytes` a 413, both as JSON and before BentoML reads or parses it.

    BentoML would otherwise parse form and multipart bodies on the JSON APIs too (a multipart body without
    a boundary escapes its parser as a 500), and it reads a body of any size into memory, a chunked one
    (no Content-Length) included.
    """

    def __init__(
        self, app: ASGIApp, routes: frozenset[str], max_bytes: int, media_types: tuple[str, ...] = JSON_MEDIA_TYPES
    ) -> None:
        self.app = app
        self.routes = routes
        self.max_bytes = max_bytes
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


def record_spans_only_when_exported() -> None:
    """With no tracing exporter configured, request spans are created non-recording.

    BentoML records a span for every request even then (its sampler keeps unsampled spans as
    RECORD_ONLY), and building them was about 40% of the event loop's CPU time under load
    (bench/cpu_serving.py, py-spy, 32 clients on 2 cores). Non-recording spans still get fresh
    trace and span ids, which the access log prints. A configured exporter (`tracing.exporter_type`)
    leaves BentoML's own sampling in place. service.py calls it when it is imported: before the server
    builds its middleware, which takes the provider once.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    if BentoMLContainer.config.tracing.exporter_type.get() is None:
        BentoMLContainer.tracer_provider.set(TracerProvider(sampler=ALWAYS_OFF))


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
