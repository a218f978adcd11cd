"""The six BentoML services and how they are assembled.

Each row of embed_core/table.py becomes one BentoML service class here, built from the base class
for its kind, so six services share one pattern:

    bentoml serve service:BgeEmbed --port 6012

Heavy imports (torch, transformers) happen inside each service's __init__. The request and answer
models, error answers and middleware they share are in embed_http/; the runners (model loading,
batching, pooling) in runners/.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import typing as t

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from embed_core.config import int_setting
from embed_core.table import SERVICES, ServiceSpec
from embed_http import clients
from embed_http.adapter import Adapter
from embed_http.cohere import COHERE
from embed_http.forms import (
    FORM_TYPES,
    FormOrJSON,
    ImageField,
    ImageInput,
    ImagesInput,
    SimilarityInput,
    image_request_limits,
    read_image_field,
)
from embed_http.middleware import JSON_MEDIA_TYPES, ApiKeyAuth, ProtocolErrors, RequestBodies, SharedPaths
from embed_http.openai import OPENAI, openai_max_inputs
from embed_http.openapi import DocumentedService, record_spans_only_when_exported
from embed_http.registry import Routing
from embed_http.schemas import (
    Dimensions,
    Documents,
    EmbeddingResponse,
    EmbeddingsResponse,
    Flag,
    NonBlankText,
    NonBlankTexts,
    RerankResponse,
    RerankResult,
    Score,
    ScoreResponse,
    SimilarityResponse,
    TopK,
    require_items,
    require_positive,
    require_text,
    require_texts,
)
from embed_http.seed import json_errors
from embed_http.shared_model import SHARED_FORWARD_ROUTE, SharedForwardResponse, SharedModelClient, model_host
from embed_http.tei import TEI_PROTOCOL
from embed_http.truncation import TokenizedText, TokenizeResponse, TruncationDirection
from runners.idle import IdleUnloading, hold_runner
from runners.images import ImageSettings

if t.TYPE_CHECKING:
    from runners.contract import ImageEncoder, Ranker, Runner, TextEncoder
    from runners.loading import ModelFiles


class ServiceBase:
    """What every service has: its table row, its runner (`engine`, typed by runners/contract.py) and GET /health."""

    spec: t.ClassVar[ServiceSpec]
    protocols: t.ClassVar[tuple[Adapter, ...]]  # the wire protocols this kind speaks besides the seed's
    protocol_app: t.ClassVar[Starlette]  # where their routes (and GET /health) are mounted, built at start
    engine: Runner

    def health(self) -> dict[str, t.Any]:
        """Answers whatever the model's state: with IDLE_UNLOAD_SECONDS set, `model_state` says loaded, unloading
        (its memory being returned), unloaded or loading (runners/idle.py)."""
        return {"status": "ok", "service": self.spec.seed_name, "model_state": "loaded", **self.engine.describe()}

    def build_routes(self) -> None:
        """GET /health and the routes of the protocols this kind speaks, each handler given this service (its runner
        and settings): called once the runner exists (finish_start_up)."""
        routes = [route for protocol in self.protocols for route in protocol.routes(self)]
        self.protocol_app.router.routes[:] = [health_route(self), *routes]

    @bentoml.on_startup
    def start_idle_timer(self) -> None:
        """In the worker's event loop, once the service is built: the idle check of a model that unloads when idle."""
        if isinstance(self.engine, IdleUnloading):
            self.engine.start_idle_timer()

    @classmethod
    def check_start_up(cls, spec: ServiceSpec) -> ModelFiles:
        """What can be checked before a worker loads the model (see check_start_up below)."""
        from embed_core.config import RunnerConfig
        from runners.loading import check_model_files

        json_body_limit(spec)
        openai_max_inputs(spec)
        clients.read_timeout()  # a bad EMBED_READ_TIMEOUT stops the server here, before any worker
        return check_model_files(RunnerConfig.from_env(spec))


class TextEmbedding(ServiceBase):
    # OpenAI's /v1/embeddings, and TEI's API (its POST /embed is apart from the seed's /embed/text).
    protocols = (OPENAI, TEI_PROTOCOL)
    engine: TextEncoder

    def __init__(self) -> None:
        from runners.embedder import TextEmbedder

        self.engine = hold_runner(self.spec, TextEmbedder)

    @classmethod
    def check_start_up(cls, spec: ServiceSpec) -> ModelFiles:
        """The model's own sentence-transformers recipe too: served, or refused now."""
        from runners.embedder import default_instruction
        from runners.pooling import read_sentence_transformers_config

        files = super().check_start_up(spec)
        default_instruction(spec, read_sentence_transformers_config(files.model_dir), str(files.root))
        return files

    @bentoml.api(route="/embed/text")
    @json_errors
    async def embed_text(
        self,
        text: NonBlankText,
        instruction: t.Optional[str] = None,
        dimensions: Dimensions = None,
        truncate: Flag = True,
        truncation_direction: TruncationDirection = "right",
    ) -> EmbeddingResponse:
        """Embed one text. Concurrent calls are merged into shared forward passes."""
        texts = [require_text(text, "text")]
        [vector], _ = await self.engine.embed_counted(
            texts, instruction, dimensions, truncate, truncation_direction, names=["text"]
        )
        return EmbeddingResponse(embedding=vector, dimension=len(vector))

    @bentoml.api(route="/embed/texts")
    @json_errors
    async def embed_texts(
        self,
        texts: NonBlankTexts,
        instruction: t.Optional[str] = None,
        dimensions: Dimensions = None,
        truncate: Flag = True,
        truncation_direction: TruncationDirection = "right",
    ) -> EmbeddingsResponse:
        """Embed several texts; the vectors come back in input order."""
        texts = require_texts(texts, "texts", self.engine.config.max_items_per_request)
        names = [f"texts[{index}]" for index in range(len(texts))]
        vectors, _ = await self.engine.embed_counted(
            texts, instruction, dimensions, truncate, truncation_direction, names=names
        )
        return EmbeddingsResponse(embeddings=vectors, dimension=len(vectors[0]))

    @bentoml.api(route=SHARED_FORWARD_ROUTE)
    @json_errors
    async def shared_forward(
        self, token_ids: list[list[int]], pooling: str, vocabulary_rows: t.Optional[list[int]] = None
    ) -> SharedForwardResponse:
        """For a service that runs on this one's model (embed_http/shared_model.py): one forward pass over token
        ids, pooled; or the logits of the vocabulary rows named."""
        values, positions = await self.engine.shared_forward(token_ids, pooling, vocabulary_rows)
        return SharedForwardResponse(values=values, positions=positions)

    @bentoml.api(route="/tokenize/texts")
    @json_errors
    async def tokenize_texts(
        self,
        texts: NonBlankTexts,
        instruction: t.Optional[str] = None,
        truncation_direction: TruncationDirection = "right",
    ) -> TokenizeResponse:
        """The tokens the model reads for each text (its prompt with the instruction, special tokens, after
        truncation), so that a client can cut long texts by the model's own tokens."""
        texts = require_texts(texts, "texts", self.engine.config.max_items_per_request)
        encoded = await self.engine.tokenize(
            self.engine.prompts(texts, instruction), truncation_direction=truncation_direction
        )
        return TokenizeResponse(
            results=[TokenizedText(ids=item["ids"], tokens=item["tokens"], count=len(item["ids"])) for item in encoded]
        )


class Reranking(ServiceBase):
    # Cohere's and Jina's /v1/rerank and /v2/rerank, OpenAI's /v1/models, and TEI's API (its /rerank shares the
    # seed's path, told apart by the body).
    protocols = (OPENAI, COHERE, TEI_PROTOCOL)
    engine: Ranker

    def __init__(self) -> None:
        from embed_core.config import RunnerConfig
        from runners.loading import locate
        from runners.reranker import Reranker

        url = model_host(self.spec)
        if url is None:
            self.engine = hold_runner(self.spec, Reranker)
        else:  # another service holds the model: this one loads none (embed_http/shared_model.py)
            config = RunnerConfig.from_env(self.spec)
            shared = SharedModelClient(self.spec, url, str(locate(config).root), config.quantization)
            self.engine = Reranker(self.spec, config, shared=shared)

    @classmethod
    def check_start_up(cls, spec: ServiceSpec) -> ModelFiles:
        model_host(spec)  # refused now if malformed, or set on a service that cannot share
        return super().check_start_up(spec)

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
        require_items(documents, "documents", self.engine.config.max_items_per_request)
        require_positive(top_k, "top_k")
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


class ImageEmbedding(ServiceBase):
    """Images and texts into one vector space (SigLIP2), plus SigLIP's own match score."""

    protocols = (OPENAI,)  # /v1/embeddings: the text tower
    engine: ImageEncoder

    def __init__(self) -> None:
        from runners.siglip import SiglipEmbedder

        self.engine = hold_runner(self.spec, SiglipEmbedder)

    @classmethod
    def check_start_up(cls, spec: ServiceSpec) -> ModelFiles:
        image_body_limit(spec)
        return super().check_start_up(spec)

    def request_limits(self) -> dict[str, int]:
        return image_request_limits(self.engine.settings)

    def build_routes(self) -> None:
        super().build_routes()
        FormOrJSON.limits = self.request_limits()  # the image APIs' form limits, from this service's settings

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


def health_route(service: ServiceBase) -> Route:
    async def answer(request: Request) -> JSONResponse:
        return JSONResponse(service.health())

    return Route("/health", answer, methods=["GET"])


def finish_start_up(init: t.Callable[[t.Any], None]) -> t.Callable[[t.Any], None]:
    """After the kind's __init__ has built the runner:

    - the routes of the protocols it speaks, and GET /health, are built with the service in hand (each handler
      is given the runner it calls), and the image APIs are given their form limits;
    - its queue reports to the project's Prometheus metrics (created here, in the worker, once BentoML
      has set up multiprocess metrics);
    - everything alive now (the model, torch, transformers, BentoML) is moved out of the garbage
      collector's reach (gc.freeze). A full collection otherwise walks those hundreds of thousands of
      objects that never die, and stalls every request while it does (BENCHMARKS.md: the p99 under load).
    """

    @functools.wraps(init)
    def __init__(self: t.Any) -> None:
        init(self)
        from embed_http.logs import log_client_errors_as_warnings
        from runners.metrics import PrometheusBatchMetrics

        log_client_errors_as_warnings()  # BentoML's validation 400s: one WARNING line, not an ERROR traceback

        self.build_routes()

        self.engine.batcher.observer = PrometheusBatchMetrics(self.spec.seed_name)
        gc.collect()  # what start-up left as garbage goes now, not into the frozen generation
        gc.freeze()

    return __init__


class EmbedService(DocumentedService):
    """A BentoML service of this project: its worker is set up by start_serving() before it serves."""

    def to_asgi(self, is_main: bool = True) -> t.Any:
        start_serving()  # in the worker, just before BentoML builds the app and starts uvicorn
        return super().to_asgi(is_main)


def build_service(spec: ServiceSpec) -> t.Any:
    """One BentoML service for one table row: GPU declared, one worker (one copy of the model per GPU)."""
    base = KIND_BASES[spec.kind]
    routing = Routing(spec.kind, base.protocols)
    protocol_app = Starlette(routes=[])  # its routes come once the service exists (finish_start_up)

    def check_model_files() -> None:
        check_start_up(spec)

    namespace = {
        "spec": spec,
        "protocol_app": protocol_app,
        "__module__": __name__,
        "__doc__": spec.title,
        "__init__": finish_start_up(base.__init__),
        "check_model_files": bentoml.on_deployment(check_model_files),
    }
    inner = type(spec.class_name, (base,), namespace)
    svc = bentoml.service(
        service_class=type(f"{spec.class_name}Service", (EmbedService,), {"routing": routing}),
        name=spec.seed_name,
        description=spec.title,
        resources={"gpu": 1},
        workers=1,
        traffic={"timeout": 600},
    )(inner)
    # A misspelt field (`dimension`, Cohere's `top_n` on /rerank) must not be dropped silently: refuse
    # unknown fields. (The image inputs are FormOrJSON models, which refuse them themselves.)
    for api in svc.apis.values():
        if not issubclass(api.input_spec, FormOrJSON):
            api.input_spec.model_config["extra"] = "forbid"
            api.input_spec.model_rebuild(force=True)
    # BentoML's own routes are POST-only and come first; this app holds GET /health and the other protocols' routes.
    svc.mount_asgi_app(protocol_app, path="/", name="protocols")
    # Middleware added first wraps the later ones. The error renderer (ProtocolErrors) is outermost, so that every
    # answer on another protocol's route is in its shape, the body checks' and the key check's too.
    svc.add_asgi_middleware(ProtocolErrors, routing=routing, max_bytes=functools.partial(json_body_limit, spec))
    # The APIs that take JSON alone (the seed paths and the protocol routes), up to MAX_REQUEST_MB; the image
    # APIs take forms too, up to what the allowed images need. The limits are read as the service starts.
    json_routes = (
        frozenset(
            api.route
            for api in svc.apis.values()
            if api.input_spec.mime_type() == "application/json" and not issubclass(api.input_spec, FormOrJSON)
        )
        | routing.post_paths()
    )
    svc.add_asgi_middleware(RequestBodies, routes=json_routes, max_bytes=functools.partial(json_body_limit, spec))
    form_routes = frozenset(api.route for api in svc.apis.values() if issubclass(api.input_spec, FormOrJSON))
    if form_routes:
        media_types = (*JSON_MEDIA_TYPES, *FORM_TYPES)
        image_body = functools.partial(image_body_limit, spec)
        svc.add_asgi_middleware(RequestBodies, routes=form_routes, max_bytes=image_body, media_types=media_types)
    svc.add_asgi_middleware(ApiKeyAuth, spec=spec)
    # Innermost: a request on a shared path (/rerank) that is another protocol's goes to that protocol's route.
    svc.add_asgi_middleware(SharedPaths, routing=routing, protocol_app=protocol_app)
    return svc


def json_body_limit(spec: ServiceSpec) -> int:
    return int_setting(spec, "MAX_REQUEST_MB", 32) * 2**20


def image_body_limit(spec: ServiceSpec) -> int:
    return image_request_limits(ImageSettings.from_env(spec))["body"]


def check_start_up(spec: ServiceSpec) -> None:
    """Runs once in `bentoml serve`'s main process, before any worker (bentoml.on_deployment): a missing or
    broken model, or a malformed setting, stops the server at once with a message naming the variable (a
    worker failing to load would be respawned by BentoML forever). Only this service's settings are read."""
    KIND_BASES[spec.kind].check_start_up(spec)


def start_serving() -> None:
    """What a worker sets up for the whole process before it serves, once (EmbedService.to_asgi calls it):

    - OpenMP (read once, when torch is imported in the service's __init__): the model's threads sleep when idle
      instead of spinning, as spinning threads starve the event loop on the same cores; a short spin still bridges
      the gaps inside one forward pass (BENCHMARKS.md, CPU serving). Either can be overridden from the environment;
    - request spans are recorded only when exported (before the server builds its middleware, which takes the
      tracer provider once: see record_spans_only_when_exported);
    - uvicorn: a deadline for request headers, new connections refused from the moment a SIGTERM arrives, and
      BentoML's request timer released when a request ends (embed_http/clients.py);
    - the GIL switch interval: the model's thread lets go of the GIL at every torch operation and must get it back
      from the event loop's; at Python's default (5 ms) a busy event loop stretches a forward pass many times over
      (BENCHMARKS.md, the GIL switch interval).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    record_spans_only_when_exported()
    clients.read_timeout()
    clients.install_header_deadline()
    clients.install_refuse_on_shutdown()
    clients.install_timeout_releasing_timer()
    sys.setswitchinterval(0.0005)


# Module-level names, so that `bentoml serve service:<Class>` finds them.
Siglip2Embed = build_service(SERVICES["siglip2_embed"])
Qwen3Embed4B = build_service(SERVICES["qwen3_4b_embed"])
BgeEmbed = build_service(SERVICES["bge_embed"])
Qwen3Embed8B = build_service(SERVICES["qwen3_8b_embed"])
Qwen3Rerank4B = build_service(SERVICES["qwen3_4b_rerank"])
Qwen3Rerank8B = build_service(SERVICES["qwen3_8b_rerank"])
