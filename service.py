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
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

import compat
from runners.config import int_setting
from runners.errors import InputError, Overloaded
from runners.images import ImageSettings
from runners.table import SERVICES, ServiceSpec

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


class Reranking(ServiceBase):
    def __init__(self) -> None:
        from runners.reranker import Reranker

        self.engine = Reranker(self.spec)

    @bentoml.api(route="/rerank")
    @json_errors
    async def rerank(
        self,
        query: NonBlankText,
        documents: Documents,
        top_k: TopK = None,
        instruction: t.Optional[str] = None,
        return_documents: Flag = True,
    ) -> RerankResponse:
        """Score every document against the query; the best first, at most top_k. Scores are P(relevant) in [0, 1]."""
        require_text(query, "query")
        if not documents:
            raise InputError("`documents` must be a non-empty list of strings", param="documents")
        limit = self.engine.config.max_items_per_request
        if len(documents) > limit:
            raise InputError(
                f"`documents` holds {len(documents)} items; at most {limit} per request", status=413, param="documents"
            )
        if top_k is not None and top_k < 1:
            raise InputError(f"`top_k` must be at least 1, got {top_k}", param="top_k")
        ranked = await self.engine.rank(query, documents, instruction, top_k)
        return RerankResponse(
            results=[
                RerankResult(original_index=index, score=score, document=documents[index] if return_documents else None)
                for index, score in ranked
            ]
        )

    @bentoml.api(route="/rerank/score")
    @json_errors
    async def rerank_score(
        self, query: NonBlankText, document: str, instruction: t.Optional[str] = None
    ) -> ScoreResponse:
        """The relevance of one document to the query, P(relevant) in [0, 1]."""
        [score] = await self.engine.score(require_text(query, "query"), [document], instruction)
        return ScoreResponse(score=score)


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


class ImageEmbedding(ServiceBase):
    """Images and texts into one vector space (SigLIP2), plus SigLIP's own match score."""

    def __init__(self) -> None:
        from runners.siglip import SiglipEmbedder

        self.engine = SiglipEmbedder(self.spec)

    def request_limits(self) -> dict[str, int]:
        return image_request_limits(self.engine.settings)

    async def _read(self, values: list[t.Any], names: list[str]) -> list[bytes | str]:
        max_bytes = self.engine.settings.limits.max_bytes
        return [await read_image_field(value, name, max_bytes) for value, name in zip(values, names, strict=True)]

    @bentoml.api(route="/embed/image", input_spec=ImageInput)
    @json_errors
    async def embed_image(self, image: ImageField) -> EmbeddingResponse:
        """Embed one image: multipart field `image`, or JSON {"image": base64 or data: URI}."""
        sources = await self._read([image], ["image"])
        [vector] = await self.engine.embed_images(sources, names=["image"])
        return EmbeddingResponse(embedding=vector, dimension=len(vector))

    @bentoml.api(route="/embed/images", input_spec=ImagesInput)
    @json_errors
    async def embed_images(self, images: list[ImageField]) -> EmbeddingsResponse:
        """Embed several images (multipart fields `images`, or JSON {"images": [...]}), in input order."""
        self.engine.check_image_count(len(images), "images")
        names = [f"images[{index}]" for index in range(len(images))]
        vectors = await self.engine.embed_images(await self._read(images, names), names=names)
        return EmbeddingsResponse(embeddings=vectors, dimension=len(vectors[0]))

    @bentoml.api(route="/embed/text")
    @json_errors
    async def embed_text(self, text: NonBlankText) -> EmbeddingResponse:
        """Embed one text with the text tower, to search image vectors."""
        [vector] = await self.engine.embed_texts([require_text(text, "text")])
        return EmbeddingResponse(embedding=vector, dimension=len(vector))

    @bentoml.api(route="/embed/texts")
    @json_errors
    async def embed_texts(self, texts: NonBlankTexts) -> EmbeddingsResponse:
        """Embed several texts with the text tower, in input order."""
        texts = require_texts(texts, "texts", self.engine.config.max_items_per_request)
        vectors = await self.engine.embed_texts(texts)
        return EmbeddingsResponse(embeddings=vectors, dimension=len(vectors[0]))

    @bentoml.api(route="/similarity", input_spec=SimilarityInput)
    @json_errors
    async def similarity(self, text: str, images: list[ImageField]) -> SimilarityResponse:
        """Score each image against one text: cosine, and sigmoid(cosine * scale + bias)."""
        require_text(text, "text")
        self.engine.check_image_count(len(images), "images")
        names = [f"images[{index}]" for index in range(len(images))]
        scores = await self.engine.similarity(text, await self._read(images, names), names=names)
        return SimilarityResponse(
            scores=[Score(**score) for score in scores], scale=self.engine.scale, bias=self.engine.bias
        )


KIND_BASES: dict[str, type[ServiceBase]] = {
    "text_embedding": TextEmbedding,
    "rerank": Reranking,
    "image_embedding": ImageEmbedding,
}


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
    leaves BentoML's own sampling in place. Runs when this module is imported: before the server
    builds its middleware, which takes the provider once.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    if BentoMLContainer.config.tracing.exporter_type.get() is None:
        BentoMLContainer.tracer_provider.set(TracerProvider(sampler=ALWAYS_OFF))


record_spans_only_when_exported()


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


def with_batch_metrics(init: t.Callable[[t.Any], None]) -> t.Callable[[t.Any], None]:
    """After the kind's __init__ has built the runner, its queue reports to the project's Prometheus metrics
    (created here, in the worker, once BentoML has set up multiprocess metrics)."""

    @functools.wraps(init)
    def __init__(self: t.Any) -> None:
        init(self)
        from runners.metrics import PrometheusBatchMetrics

        self.engine.batcher.observer = PrometheusBatchMetrics(self.spec.seed_name)

    return __init__


def build_service(spec: ServiceSpec) -> t.Any:
    """One BentoML service for one table row: GPU declared, one worker (one copy of the model per GPU)."""
    base = KIND_BASES[spec.kind]

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
        "__init__": with_batch_metrics(base.__init__),
        "check_model_files": bentoml.on_deployment(check_model_files),
    }
    inner = type(spec.class_name, (base,), namespace)
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
    # A misspelt field (`dimension`, Cohere's `top_n` on /rerank) must not be dropped silently: refuse
    # unknown fields. (The image inputs are FormOrJSON models, which refuse them themselves.)
    for api in svc.apis.values():
        if not issubclass(api.input_spec, FormOrJSON):
            api.input_spec.model_config["extra"] = "forbid"
            api.input_spec.model_rebuild(force=True)
    # The APIs that take JSON alone, up to MAX_REQUEST_MB; the image APIs take forms too, up to what the
    # allowed images need.
    json_routes = frozenset(
        api.route
        for api in svc.apis.values()
        if api.input_spec.mime_type() == "application/json" and not issubclass(api.input_spec, FormOrJSON)
    )
    max_bytes = int_setting(spec, "MAX_REQUEST_MB", 32) * 2**20
    svc.add_asgi_middleware(RequestBodies, routes=json_routes, max_bytes=max_bytes)
    form_routes = frozenset(api.route for api in svc.apis.values() if issubclass(api.input_spec, FormOrJSON))
    if form_routes:
        image_body = image_request_limits(ImageSettings.from_env(spec))["body"]
        media_types = (*JSON_MEDIA_TYPES, *FORM_TYPES)
        svc.add_asgi_middleware(RequestBodies, routes=form_routes, max_bytes=image_body, media_types=media_types)
    # The OpenAI / Cohere-compatible routes (compat.py), their error shape, and the optional API key
    # (middleware added first wraps the later ones: the key check's 401 is reshaped on /v1 too).
    svc.mount_asgi_app(compat.protocol_app(spec), path="/", name="protocols")
    svc.add_asgi_middleware(compat.ProtocolErrors)
    svc.add_asgi_middleware(compat.ApiKeyAuth, spec=spec)
    return svc


# Module-level names, so that `bentoml serve service:<Class>` finds them.
Siglip2Embed = build_service(SERVICES["siglip2_embed"])
Qwen3Embed4B = build_service(SERVICES["qwen3_4b_embed"])
BgeEmbed = build_service(SERVICES["bge_embed"])
Qwen3Embed8B = build_service(SERVICES["qwen3_8b_embed"])
Qwen3Rerank4B = build_service(SERVICES["qwen3_4b_rerank"])
Qwen3Rerank8B = build_service(SERVICES["qwen3_8b_rerank"])
