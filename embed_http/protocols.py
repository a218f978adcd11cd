"""What tools that already speak to embedding servers expect: the OpenAI and Cohere/Jina routes.

- `POST /v1/embeddings`, `GET /v1/models` (OpenAI) on the embedding services (SigLIP2: its text tower);
- `POST /v1/rerank` (Cohere v1 and Jina) and `POST /v2/rerank` (Cohere v2) on the rerank services.

Their errors are OpenAI-shaped (embed_http/errors.py; middleware.ProtocolErrors reshapes those Starlette
or BentoML produce on these paths), and the API key guards them as every route (middleware.ApiKeyAuth).
These routes are a small Starlette app that service.py mounts next to the BentoML API: it parses and
validates its own JSON (so every answer is in the protocol's shape) and calls the same runner
(`service.engine`) as the seed's paths, through the same queue.
"""

from __future__ import annotations

import base64
import functools
import json
import time
import typing as t
import uuid

import bentoml
import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from embed_core.config import int_setting
from embed_core.errors import InputError
from embed_http import token_ids
from embed_http.errors import STATUS, openai_errors
from embed_http.schemas import Dimensions, Flag, TopK, require_items, require_positive, require_text

if t.TYPE_CHECKING:
    from embed_core.table import ServiceSpec
    from runners.contract import Embedder, Ranker

OPENAI_MAX_INPUTS = 2048  # OpenAI's own limit on /v1/embeddings (LangChain sends 1000 at once by default)
OWNER = "embed-services"
STARTED = int(time.time())


class Served(t.Protocol):
    """The service a route runs in (service.py's classes): its table row and its runner."""

    spec: ServiceSpec


class EmbeddingService(Served, t.Protocol):
    engine: Embedder


class RerankService(Served, t.Protocol):
    engine: Ranker


def protocol_endpoint(
    handler: t.Callable[[Request, t.Any], t.Awaitable[dict]],  # the service: one of the protocols above
) -> t.Callable[[Request], t.Awaitable[Response]]:
    """Runs a handler with the current service; every failure becomes an OpenAI-shaped error."""

    @openai_errors
    async def endpoint(request: Request) -> Response:
        return JSONResponse(await handler(request, bentoml.get_current_service()))

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


def model_id(service: Served) -> str:
    """The name /v1/models lists and answers carry: the service's seed name (e.g. qwen3_8b_embed)."""
    return service.spec.seed_name


# -- OpenAI embeddings ------------------------------------------------------------------------------


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients add fields of their own (e.g. `user`)

    input: t.Any = None  # checked by input_texts, for messages that say what is wrong
    model: t.Optional[str] = None  # any name is accepted; the service has one model
    encoding_format: t.Literal["float", "base64"] = "float"
    dimensions: Dimensions = None
    instruction: t.Optional[str] = None  # not OpenAI's: a task instruction for queries (Qwen3, BGE)
    # Not OpenAI's either: what happens to a text over max_length tokens (embed_http/truncation.py).
    truncate: Flag = True
    truncation_direction: t.Literal["right", "left"] = "right"


@functools.lru_cache
def openai_max_inputs(spec: ServiceSpec) -> int:
    """Inputs per request on /v1/embeddings: OpenAI's 2048 unless `<NAME>_OPENAI_MAX_INPUTS` says otherwise
    (the seed paths keep MAX_ITEMS_PER_REQUEST; the batcher cuts forward passes by tokens either way)."""
    return int_setting(spec, "OPENAI_MAX_INPUTS", OPENAI_MAX_INPUTS)


def input_texts(value: t.Any, limit: int) -> list[str]:
    """OpenAI's `input`, one string or a list, checked as OpenAI does: an empty string is refused; a blank item
    (" ", "\n") in a batch is embedded as sent. A request with nothing but blank text is refused, as on the seed
    paths (require_text)."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise InputError("`input` must be a string or a non-empty list of strings", param="input")
    if any(isinstance(item, (int, list)) for item in texts):
        message = "`input` mixes strings and token ids; send a list of strings or a list of token-id lists"
        raise InputError(message, param="input")
    require_items(texts, "input", limit)
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise InputError(f"`input[{index}]` must be a non-empty string", param=f"input[{index}]")
    if not any(text.strip() for text in texts):
        require_text(texts[0], "input" if isinstance(value, str) else "input[0]")
    return texts


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # as OpenAI: the little-endian float32 bytes, base64-encoded
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


async def create_embeddings(request: Request, service: EmbeddingService) -> dict:
    body = await read_json(request, EmbeddingsRequest)
    limit = openai_max_inputs(service.spec)
    value = body.input
    if token_ids.is_token_input(value):
        value = await token_ids.decode_token_input(value, body.model, service.spec, limit)
    texts = input_texts(value, limit)
    options: dict[str, t.Any] = {}
    if not body.truncate or body.truncation_direction != "right":
        if service.spec.kind != "text_embedding":
            message = "`truncate` and `truncation_direction` are for the text services; SigLIP2 cuts at the end"
            raise InputError(message, param="truncate")
        names = ["input"] if isinstance(value, str) else [f"input[{index}]" for index in range(len(texts))]
        options = {"truncate": body.truncate, "truncation_direction": body.truncation_direction, "names": names}
    vectors, tokens = await service.engine.embed_counted(texts, body.instruction, body.dimensions, **options)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": encode_vector(vector, body.encoding_format)}
            for index, vector in enumerate(vectors)
        ],
        "model": model_id(service),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def model_card(service: Served) -> dict:
    return {"id": model_id(service), "object": "model", "created": STARTED, "owned_by": OWNER}


async def list_models(request: Request, service: Served) -> dict:
    return {"object": "list", "data": [model_card(service)]}


async def retrieve_model(request: Request, service: Served) -> dict:
    wanted = request.path_params["model"]
    if wanted != model_id(service):
        message = f"no model {wanted!r} here; this service serves {model_id(service)!r}"
        raise InputError(message, status=STATUS["not_found"], param="model")
    return model_card(service)


# -- Cohere / Jina rerank ------------------------------------------------------------------------------


class DocumentObject(BaseModel):
    model_config = ConfigDict(extra="allow")  # Cohere: the other fields come back in the answer

    text: str  # pydantic takes no number or list as a string: strict as it is


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # rank_fields, max_chunks_per_doc, max_tokens_per_doc: not used

    query: str
    documents: list[t.Union[str, DocumentObject]]
    top_n: TopK = None
    return_documents: t.Optional[Flag] = None
    model: t.Optional[str] = None
    instruction: t.Optional[str] = None  # not Cohere's: the reranker's task instruction


def rerank_handler(return_documents_default: bool) -> t.Callable[[Request, RerankService], t.Awaitable[dict]]:
    async def rerank(request: Request, service: RerankService) -> dict:
        body = await read_json(request, RerankRequest)
        require_text(body.query, "query")
        require_items(body.documents, "documents", service.engine.config.max_items_per_request)
        require_positive(body.top_n, "top_n")
        texts = [doc if isinstance(doc, str) else doc.text for doc in body.documents]
        ranked = await service.engine.rank(body.query, texts, body.instruction, body.top_n)
        with_documents = return_documents_default if body.return_documents is None else body.return_documents
        results = []
        for index, score in ranked:
            result: dict[str, t.Any] = {"index": index, "relevance_score": score}
            if with_documents:
                document = body.documents[index]
                result["document"] = {"text": document} if isinstance(document, str) else document.model_dump()
            results.append(result)
        return {"id": str(uuid.uuid4()), "model": model_id(service), "results": results}

    return rerank


EMBEDDING_ROUTES = [
    Route("/v1/embeddings", protocol_endpoint(create_embeddings), methods=["POST"]),
    Route("/v1/models", protocol_endpoint(list_models), methods=["GET"]),
    Route("/v1/models/{model:path}", protocol_endpoint(retrieve_model), methods=["GET"]),
]
RERANK_ROUTES = [
    # Jina and Cohere v1 (`cohere.Client`) post here; documents come back unless return_documents=false.
    Route("/v1/rerank", protocol_endpoint(rerank_handler(return_documents_default=True)), methods=["POST"]),
    # Cohere v2 (`cohere.ClientV2`) never asks for documents back.
    Route("/v2/rerank", protocol_endpoint(rerank_handler(return_documents_default=False)), methods=["POST"]),
    Route("/v1/models", protocol_endpoint(list_models), methods=["GET"]),
    Route("/v1/models/{model:path}", protocol_endpoint(retrieve_model), methods=["GET"]),
]
