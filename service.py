"""The BentoML services: HTTP and validation, nothing else.

Each row of runners/table.py becomes one BentoML service class here, built from the base class
for its kind, so six services share one pattern:

    bentoml serve service:BgeEmbed --port 6012

Heavy imports (torch, transformers) happen inside each service's __init__.
"""

from __future__ import annotations

import functools
import typing as t

import bentoml
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from runners.errors import InputError, Overloaded
from runners.table import SERVICES, ServiceSpec


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
        self, text: str, instruction: t.Optional[str] = None, dimensions: t.Optional[int] = None
    ) -> EmbeddingResponse:
        """Embed one text. Concurrent calls are merged into shared forward passes."""
        [vector] = await self.engine.embed([require_text(text, "text")], instruction, dimensions)
        return EmbeddingResponse(embedding=vector, dimension=len(vector))

    @bentoml.api(route="/embed/texts")
    @json_errors
    async def embed_texts(
        self, texts: list[str], instruction: t.Optional[str] = None, dimensions: t.Optional[int] = None
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
        query: str,
        documents: list[str],
        top_k: t.Optional[int] = None,
        instruction: t.Optional[str] = None,
        return_documents: bool = True,
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
    async def rerank_score(self, query: str, document: str, instruction: t.Optional[str] = None) -> ScoreResponse:
        """The relevance of one document to the query, P(relevant) in [0, 1]."""
        [score] = await self.engine.score(require_text(query, "query"), [document], instruction)
        return ScoreResponse(score=score)


KIND_BASES: dict[str, type[ServiceBase]] = {"text_embedding": TextEmbedding, "rerank": Reranking}


async def _health(request: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().health())


def build_service(spec: ServiceSpec) -> t.Any:
    """One BentoML service for one table row: GPU declared, one worker (one copy of the model per GPU)."""
    inner = type(
        spec.class_name, (KIND_BASES[spec.kind],), {"spec": spec, "__module__": __name__, "__doc__": spec.title}
    )
    svc = bentoml.service(
        name=spec.seed_name,
        description=spec.title,
        resources={"gpu": 1},
        workers=1,
        traffic={"timeout": 600},
    )(inner)
    # BentoML's own routes are POST-only; a small mounted app answers GET /health.
    svc.mount_asgi_app(Starlette(routes=[Route("/health", _health, methods=["GET"])]), path="/", name="health")
    return svc


# Module-level names, so that `bentoml serve service:<Class>` finds them.
Qwen3Embed4B = build_service(SERVICES["qwen3_4b_embed"])
BgeEmbed = build_service(SERVICES["bge_embed"])
Qwen3Embed8B = build_service(SERVICES["qwen3_8b_embed"])
Qwen3Rerank4B = build_service(SERVICES["qwen3_4b_rerank"])
Qwen3Rerank8B = build_service(SERVICES["qwen3_8b_rerank"])
