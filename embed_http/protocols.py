"""What tools that already speak to embedding servers expect: the OpenAI and Cohere/Jina protocols,
errors in the shape their clients parse, and an API key.

- `POST /v1/embeddings`, `GET /v1/models` (OpenAI) on the embedding services (SigLIP2: its text tower);
- `POST /v1/rerank` (Cohere v1 and Jina) and `POST /v2/rerank` (Cohere v2) on the rerank services;
- every error on `/v1/*` and `/v2/*` as OpenAI's `{"error": {"message", "type", "param", "code"}}`
  (`ProtocolErrors`, which also reshapes errors that Starlette or BentoML produce on those paths);
- `EMBED_API_KEY`: a bearer token for every route except the health probes (`ApiKeyAuth`).

These routes are a small Starlette app that service.py mounts next to the BentoML API: it parses and
validates its own JSON (so every answer is in the protocol's shape) and calls the same runner
(`service.engine`) as the seed's paths, through the same queue.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import time
import typing as t
import uuid

import bentoml
import numpy as np
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embed_http import token_ids
from runners.config import int_setting, setting
from runners.errors import InputError, Overloaded
from runners.table import ServiceSpec

PROTOCOL_PREFIXES = ("/v1/", "/v2/")
MAX_BODY_BYTES = 32 * 1024 * 1024  # far above what max_items_per_request texts of max_length tokens take
OPENAI_MAX_INPUTS = 2048  # OpenAI's own limit on /v1/embeddings (LangChain sends 1000 at once by default)
OWNER = "embed-services"
STARTED = int(time.time())

# OpenAI's error `type` and `code` for the statuses these routes answer with.
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
ERROR_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class ProtocolError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": message, "type": kind, "param": param, "code": code or ERROR_CODES.get(status)}
    # `detail` too: Jina's clients (LlamaIndex and LangChain's JinaRerank) raise RuntimeError(body["detail"]).
    return {"error": error, "detail": message}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(openai_error_body(status, message, param, code), status_code=status, headers=headers)


def protocol_endpoint(
    handler: t.Callable[[Request, t.Any], t.Awaitable[dict]],
) -> t.Callable[[Request], t.Awaitable[Response]]:
    """Runs a handler with the current service; every failure becomes an OpenAI-shaped error."""

    async def endpoint(request: Request) -> Response:
        try:
            return JSONResponse(await handler(request, bentoml.get_current_service()))
        except ProtocolError as exc:
            return openai_error(exc.status, exc.message, exc.param, exc.code)
        except InputError as exc:
            return openai_error(exc.status, exc.message, exc.param)
        except Overloaded as exc:
            return openai_error(503, str(exc), code="overloaded")

    return endpoint


async def read_json(request: Request, model: type[BaseModel]) -> t.Any:
    """The body as `model`, or a 4xx naming the problem (size, JSON syntax, then the first wrong field)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ProtocolError(413, f"the request body is {declared} bytes; at most {MAX_BODY_BYTES}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ProtocolError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
        # JSON may escape a lone surrogate ("\ud800"), which is no Unicode text: refuse it here, as
        # pydantic's parser does on the seed paths, rather than let the tokenizer fail on it.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(400, f"the body is not valid JSON text: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ProtocolError(400, f"`{param}`: {first['msg']}", param=param) from None


def model_id(service: t.Any) -> str:
    """The name /v1/models lists and answers carry: the service's seed name (e.g. qwen3_8b_embed)."""
    return service.spec.seed_name


# -- OpenAI embeddings ------------------------------------------------------------------------------


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients add fields of their own (e.g. `user`)

    input: t.Any = None  # checked by texts_from_input, for messages that say what is wrong
    model: t.Optional[StrictStr] = None  # any name is accepted; the service has one model
    encoding_format: t.Literal["float", "base64"] = "float"
    dimensions: t.Optional[StrictInt] = None
    instruction: t.Optional[StrictStr] = None  # not OpenAI's: a task instruction for queries (Qwen3, BGE)
    # Not OpenAI's either: what happens to a text over max_length tokens (embed_http/truncation.py).
    truncate: StrictBool = True
    truncation_direction: t.Literal["right", "left"] = "right"


@functools.lru_cache
def openai_max_inputs(spec: ServiceSpec) -> int:
    """Inputs per request on /v1/embeddings: OpenAI's 2048 unless `<NAME>_OPENAI_MAX_INPUTS` says otherwise
    (the seed paths keep MAX_ITEMS_PER_REQUEST; the batcher cuts forward passes by tokens either way)."""
    return int_setting(spec, "OPENAI_MAX_INPUTS", OPENAI_MAX_INPUTS)


def texts_from_input(value: t.Any, limit: int) -> list[str]:
    """As OpenAI: an empty string is refused; a blank item (" ", "\n") in a batch is embedded as sent. A request
    with nothing but blank text is refused, as on the seed paths."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise ProtocolError(400, "`input` must be a string or a non-empty list of strings", param="input")
    if any(isinstance(item, (int, list)) for item in texts):
        message = "`input` mixes strings and token ids; send a list of strings or a list of token-id lists"
        raise ProtocolError(400, message, param="input")
    if len(texts) > limit:
        raise ProtocolError(413, f"`input` holds {len(texts)} items; at most {limit} per request", param="input")
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise ProtocolError(400, f"`input[{index}]` must be a non-empty string", param=f"input[{index}]")
    if not any(text.strip() for text in texts):
        name = "input" if isinstance(value, str) else "input[0]"
        raise ProtocolError(400, f"`{name}` must be a non-empty string (not only whitespace)", param=name)
    return texts


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # as OpenAI: the little-endian float32 bytes, base64-encoded
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


async def create_embeddings(request: Request, service: t.Any) -> dict:
    body = await read_json(request, EmbeddingsRequest)
    limit = openai_max_inputs(service.spec)
    value = body.input
    if token_ids.is_token_input(value):
        value = await token_ids.decode_token_input(value, body.model, service.spec, limit)
    texts = texts_from_input(value, limit)
    options: dict[str, t.Any] = {}
    if not body.truncate or body.truncation_direction != "right":
        if service.spec.kind != "text_embedding":
            message = "`truncate` and `truncation_direction` are for the text services; SigLIP2 cuts at the end"
            raise ProtocolError(400, message, param="truncate")
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


def model_card(service: t.Any) -> dict:
    return {"id": model_id(service), "object": "model", "created": STARTED, "owned_by": OWNER}


async def list_models(request: Request, service: t.Any) -> dict:
    return {"object": "list", "data": [model_card(service)]}


async def retrieve_model(request: Request, service: t.Any) -> dict:
    wanted = request.path_params["model"]
    if wanted != model_id(service):
        raise ProtocolError(404, f"no model {wanted!r} here; this service serves {model_id(service)!r}", "model")
    return model_card(service)


# -- Cohere / Jina rerank ------------------------------------------------------------------------------


class DocumentObject(BaseModel):
    model_config = ConfigDict(extra="allow")  # Cohere: the other fields come back in the answer

    text: StrictStr


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # rank_fields, max_chunks_per_doc, max_tokens_per_doc: not used

    query: StrictStr
    documents: list[t.Union[StrictStr, DocumentObject]]
    top_n: t.Optional[StrictInt] = None
    return_documents: t.Optional[StrictBool] = None
    model: t.Optional[StrictStr] = None
    instruction: t.Optional[StrictStr] = None  # not Cohere's: the reranker's task instruction


def rerank_handler(return_documents_default: bool) -> t.Callable[[Request, t.Any], t.Awaitable[dict]]:
    async def rerank(request: Request, service: t.Any) -> dict:
        body = await read_json(request, RerankRequest)
        if not body.query.strip():
            raise ProtocolError(400, "`query` must be a non-empty string", param="query")
        if not body.documents:
            raise ProtocolError(400, "`documents` must be a non-empty list", param="documents")
        limit = service.engine.config.max_items_per_request
        if len(body.documents) > limit:
            message = f"`documents` holds {len(body.documents)} items; at most {limit} per request"
            raise ProtocolError(413, message, param="documents")
        if body.top_n is not None and body.top_n < 1:
            raise ProtocolError(400, f"`top_n` must be at least 1, got {body.top_n}", param="top_n")
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
PROTOCOL_ROUTES = {"text_embedding": EMBEDDING_ROUTES, "image_embedding": EMBEDDING_ROUTES, "rerank": RERANK_ROUTES}


def protocol_app(spec: ServiceSpec) -> Starlette:
    openai_max_inputs(spec)  # a wrong setting stops the start-up
    return Starlette(routes=PROTOCOL_ROUTES[spec.kind])


# -- middleware: error shapes and the API key ----------------------------------------------------------


class ProtocolErrors:
    """On /v1/* and /v2/*, an error answer that is not yet OpenAI-shaped (Starlette's plain-text 404 and
    405, BentoML's own errors, the API-key check's JSON) is rewritten into `{"error": {...}}`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTOCOL_PREFIXES):
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
            if not already_openai_shaped(body):
                rewritten = JSONResponse(openai_error_body(status, error_message(body, status)), status_code=status)
                extra = [(k, v) for k, v in start.get("headers", []) if k.lower() == b"www-authenticate"]
                start = {**start, "headers": rewritten.raw_headers + extra}
                body = rewritten.body
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, reshape)


def already_openai_shaped(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("error"), dict) and "message" in data["error"]


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
        response = JSONResponse(
            {"error": "missing or wrong API key: send the header `Authorization: Bearer <key>`"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)

    def authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        assert self.key is not None
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)
