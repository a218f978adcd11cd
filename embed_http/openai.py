"""OpenAI's protocol: `POST /v1/embeddings` and `GET /v1/models[/{model}]` on the embedding services (SigLIP2: its
text tower), answered as OpenAI's `{"error": {"message", "type", "param", "code"}}` on failure, for the clients
built for it (openai, LangChain's OpenAIEmbeddings, LlamaIndex's OpenAILikeEmbedding, Chroma).

Token-id input (LangChain sends tiktoken ids at its defaults) is decoded with OpenAI's own encoding
(embed_http/token_ids.py), as those are OpenAI's token ids, not the model's.
"""

from __future__ import annotations

import base64
import functools
import time
import typing as t

import numpy as np
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse

from embed_core.config import int_setting
from embed_core.errors import InputError
from embed_http import token_ids
from embed_http.adapter import Adapter, Endpoint, Served, read_json
from embed_http.errors import STATUS, json_object
from embed_http.schemas import Dimensions, Flag, require_items, require_text

if t.TYPE_CHECKING:
    from embed_core.table import ServiceSpec

OPENAI_MAX_INPUTS = 2048  # OpenAI's own limit on /v1/embeddings (LangChain sends 1000 at once by default)
OWNER = "embed-services"
STARTED = int(time.time())

# OpenAI's error `type` and `code` for each status (its clients parse them).
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
OPENAI_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": message, "type": kind, "param": param, "code": code or OPENAI_CODES.get(status)}
    # `detail` too: Jina's clients (LlamaIndex and LangChain's JinaRerank) raise RuntimeError(body["detail"]).
    return {"error": error, "detail": message}


class OpenAI(Adapter):
    name = "openai"
    namespaces = ("/v1/", "/v2/")  # an unknown /v1/ path (/v1/chat/completions) is a 404 in OpenAI's shape

    def endpoints(self, kind: str) -> list[Endpoint]:
        models = [
            Endpoint("/v1/models", "GET", list_models),
            Endpoint("/v1/models/{model:path}", "GET", retrieve_model),
        ]
        embeddings = [Endpoint("/v1/embeddings", "POST", create_embeddings)]
        return [*embeddings, *models] if kind in ("text_embedding", "image_embedding") else models

    def error(
        self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        code = "overloaded" if status == STATUS["overloaded"] else None
        if status == STATUS["unauthorized"]:
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
        return JSONResponse(openai_error_body(status, message, param, code), status_code=status, headers=headers)

    def is_error_shaped(self, body: bytes) -> bool:
        data = json_object(body)
        return data is not None and isinstance(data.get("error"), dict) and "message" in data["error"]


OPENAI = OpenAI()


def model_id(served: Served) -> str:
    """The name /v1/models lists and answers carry: the service's seed name (e.g. qwen3_8b_embed)."""
    return served.spec.seed_name


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


async def create_embeddings(served: Served, request: Request) -> dict:
    body = await read_json(request, EmbeddingsRequest)
    limit = openai_max_inputs(served.spec)
    value = body.input
    if token_ids.is_token_input(value):
        value = await token_ids.decode_token_input(value, body.model, served.spec, limit)
    texts = input_texts(value, limit)
    options: dict[str, t.Any] = {}
    if not body.truncate or body.truncation_direction != "right":
        if served.spec.kind != "text_embedding":
            message = "`truncate` and `truncation_direction` are for the text services; SigLIP2 cuts at the end"
            raise InputError(message, param="truncate")
        names = ["input"] if isinstance(value, str) else [f"input[{index}]" for index in range(len(texts))]
        options = {"truncate": body.truncate, "truncation_direction": body.truncation_direction, "names": names}
    vectors, tokens = await served.engine.embed_counted(texts, body.instruction, body.dimensions, **options)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": encode_vector(vector, body.encoding_format)}
            for index, vector in enumerate(vectors)
        ],
        "model": model_id(served),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def model_card(served: Served) -> dict:
    return {"id": model_id(served), "object": "model", "created": STARTED, "owned_by": OWNER}


async def list_models(served: Served, request: Request) -> dict:
    return {"object": "list", "data": [model_card(served)]}


async def retrieve_model(served: Served, request: Request) -> dict:
    wanted = request.path_params["model"]
    if wanted != model_id(served):
        message = f"no model {wanted!r} here; this service serves {model_id(served)!r}"
        raise InputError(message, kind="not_found", param="model")
    return model_card(served)
