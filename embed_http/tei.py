"""Hugging Face text-embeddings-inference (TEI)'s protocol, as its published OpenAPI document describes it (v1.9.3;
the tests validate every answer against that document, shipped in tests/data/), for the clients built for it
(huggingface_hub's InferenceClient, LangChain's HuggingFaceEndpointEmbeddings, LlamaIndex's TextEmbeddingsInference
and TEI rerank, Haystack's HuggingFaceTEIRanker):

- text embedding services: `POST /embed` (strings, token ids, or a list of either), `/tokenize`, `/decode`,
  `/similarity`, `GET /info`; `/embed_all`, `/embed_sparse` and `/predict` answer TEI's own 424 (not this model);
- rerank services: `POST /rerank` on the seed's path, told apart by its body (`texts`: TEI's; `documents`: the
  seed's), `/tokenize`, `/decode`, `GET /info`; TEI's embedding routes answer its 424;
- errors as TEI's `{"error", "error_type"}`, with TEI's statuses: 413 too many inputs, 422 a text over max_length
  (truncate=false) or an unknown token id, 424 not this model, 429 overloaded.

Differences from TEI, by design (README, "TEI's API"): vectors are always normalized (`normalize: false` is
refused); a text over max_length is cut unless `truncate` is false (TEI refuses it unless started with
--auto-truncate: /info says auto_truncate=true); token ids are embedded as the model's own tokens, as sent (TEI
decodes and re-encodes them); the rerankers always cut the query/document part of a pair to fit (`truncate: false`
and `truncation_direction: left` are refused there); `instruction` (the project's task instruction) is taken beside
`prompt_name`; a refused API key answers 401 in TEI's shape (TEI sends no body).
"""

from __future__ import annotations

import typing as t

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import JSONResponse

from embed_core.errors import InputError, Overloaded
from embed_http.adapter import Adapter, Endpoint, Served, read_json
from embed_http.errors import json_object, retry_headers
from embed_http.schemas import require_items, require_text, require_texts

TEI_VERSION = "1.9.3"  # the TEI API these routes follow (its /info reports a version; clients do not check it)

Direction = t.Literal["right", "left", "Right", "Left"]  # TEI takes both spellings

# TEI's error_type (its ErrorType enum) and status for each kind of failure (router/src/http/server.rs).
TEI_ERRORS: dict[str, tuple[int, str]] = {
    "bad_input": (400, "Validation"),
    "empty": (400, "Empty"),
    "too_large": (413, "Validation"),
    "too_long": (422, "Validation"),
    "bad_token": (422, "Tokenizer"),
    "unsupported_media_type": (415, "Validation"),
    "not_found": (404, "Validation"),
    "not_this_model": (424, "Backend"),
    "overloaded": (429, "Overloaded"),
}
# For answers made by other layers (the body checks, the API key, Starlette's 404/405), by status: a client error
# is TEI's "Validation" (it has no kind for a refused key: it answers that with a bare 401), a server error "Backend".
TEI_ERROR_TYPES = {424: "Backend", 429: "Overloaded", 503: "Unhealthy"}


class TEI(Adapter):
    name = "tei"
    statuses = {kind: status for kind, (status, _) in TEI_ERRORS.items()}

    def endpoints(self, kind: str) -> list[Endpoint]:
        if kind == "text_embedding":
            return [
                Endpoint("/embed", "POST", embed, operation=operation(EMBED_REQUEST, EMBEDDINGS, 400, 413, 422, 429)),
                Endpoint("/similarity", "POST", similarity, operation=operation(SIMILARITY_REQUEST, SCORES, *TEXT)),
                Endpoint("/tokenize", "POST", tokenize, operation=operation(TOKENIZE_REQUEST, TOKENS, 400, 413, 422)),
                Endpoint("/decode", "POST", decode, operation=operation(DECODE_REQUEST, TEXTS, 400, 413, 422)),
                Endpoint("/info", "GET", info, operation=operation(None, INFO)),
                *not_this_model(["/embed_all", "/embed_sparse", "/predict"]),
            ]
        if kind == "rerank":
            return [
                Endpoint(
                    "/rerank", "POST", rerank, claims=is_tei_rerank, operation=operation(RERANK_REQUEST, RANKS, *TEXT)
                ),
                Endpoint("/tokenize", "POST", tokenize, operation=operation(TOKENIZE_REQUEST, TOKENS, 400, 413, 422)),
                Endpoint("/decode", "POST", decode, operation=operation(DECODE_REQUEST, TEXTS, 400, 413, 422)),
                Endpoint("/info", "GET", info, operation=operation(None, INFO)),
                *not_this_model(["/embed", "/embed_all", "/embed_sparse", "/similarity"]),
            ]
        return []

    def error(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        error_type: str | None = None,
    ) -> JSONResponse:
        kind = error_type or TEI_ERROR_TYPES.get(status, "Backend" if status >= 500 else "Validation")
        return JSONResponse({"error": message, "error_type": kind}, status_code=status, headers=headers)

    def answer(self, exc: InputError | Overloaded) -> JSONResponse:
        status, error_type = TEI_ERRORS[exc.kind]
        message = exc.message if isinstance(exc, InputError) else str(exc)
        return self.error(status, message, headers=retry_headers(exc), error_type=error_type)

    def is_error_shaped(self, body: bytes) -> bool:
        data = json_object(body)
        return data is not None and isinstance(data.get("error"), str) and "error_type" in data


TEI_PROTOCOL = TEI()


def is_tei_rerank(body: t.Any) -> bool:
    """TEI's rerank request names its documents `texts`; the seed's names them `documents`."""
    return isinstance(body, dict) and "texts" in body


# -- requests -----------------------------------------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is refused, not dropped


class EmbedRequest(Strict):
    inputs: t.Any  # TEI's Input: a string, token ids, or a list of either (read by embed_inputs)
    normalize: StrictBool = True
    truncate: t.Optional[StrictBool] = None
    truncation_direction: Direction = "right"
    prompt_name: t.Optional[StrictStr] = None
    dimensions: t.Optional[StrictInt] = None
    instruction: t.Optional[StrictStr] = None  # not TEI's: the project's task instruction (Qwen3, BGE)
    encoding_format: t.Optional[t.Literal["float"]] = None  # huggingface_hub may send it; floats are what TEI gives


class TokenizeRequest(Strict):
    inputs: t.Union[StrictStr, list[StrictStr]]
    add_special_tokens: StrictBool = True
    prompt_name: t.Optional[StrictStr] = None
    truncation_direction: Direction = "right"  # not TEI's: which end a text over max_length loses
    instruction: t.Optional[StrictStr] = None


class DecodeRequest(Strict):
    ids: t.Union[list[StrictInt], list[list[StrictInt]]]
    skip_special_tokens: StrictBool = True


class SimilarityInput(Strict):
    source_sentence: StrictStr
    sentences: list[StrictStr]


class SimilarityParameters(Strict):
    prompt_name: t.Optional[StrictStr] = None
    truncate: t.Optional[StrictBool] = None
    truncation_direction: Direction = "right"


class SimilarityRequest(Strict):
    inputs: SimilarityInput
    parameters: t.Optional[SimilarityParameters] = None


class RerankRequest(Strict):
    query: StrictStr
    texts: list[StrictStr]
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: t.Optional[StrictBool] = None
    truncation_direction: Direction = "right"
    instruction: t.Optional[StrictStr] = None  # not TEI's: the reranker's task instruction


# -- reading inputs ------------------------------------------------------------------------------------------


def is_token_ids(value: t.Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, int) and not isinstance(item, bool) for item in value)


def embed_inputs(value: t.Any, limit: int) -> tuple[list[str | list[int]], list[str]]:
    """TEI's Input: one string, one list of token ids, or a list of strings and token-id lists; with the name of
    each (`inputs`, `inputs[3]`). Blank texts are refused with their index, as on the seed paths."""
    if isinstance(value, str):
        return [require_text(value, "inputs")], ["inputs"]
    if is_token_ids(value) and value:
        return [value], ["inputs"]
    if not isinstance(value, list):
        raise InputError("`inputs` must be a string, a list of token ids, or a list of either", param="inputs")
    require_items(value, "inputs", limit)
    names = [f"inputs[{index}]" for index in range(len(value))]
    for item, name in zip(value, names, strict=True):
        if isinstance(item, str):
            require_text(item, name)
        elif not is_token_ids(item):
            raise InputError(f"`{name}` must be a string or a list of token ids (integers)", param=name)
    return value, names


def texts_and_names(inputs: str | list[str], limit: int) -> tuple[list[str], list[str]]:
    if isinstance(inputs, str):
        return [require_text(inputs, "inputs")], ["inputs"]
    return require_texts(inputs, "inputs", limit), [f"inputs[{index}]" for index in range(len(inputs))]


def prompted(texts: list[str], prompt_name: str | None, served: Served) -> list[str]:
    if prompt_name is None:
        return texts
    prompts = getattr(served.engine, "named_prompts", {})
    if prompt_name not in prompts:
        known = ", ".join(sorted(prompts)) or "none"
        message = f"`prompt_name` {prompt_name!r} is not one of the model's prompts ({known})"
        raise InputError(message, param="prompt_name")
    return [prompts[prompt_name] + text for text in texts]  # as sentence-transformers: the prompt, then the text


# -- handlers -----------------------------------------------------------------------------------------------


async def embed(served: Served, request: Request) -> list[list[float]]:
    body = await read_json(request, EmbedRequest)
    if not body.normalize:
        raise InputError("`normalize`: this service returns normalized vectors only", param="normalize")
    inputs, names = embed_inputs(body.inputs, served.engine.config.max_items_per_request)
    texts = [item for item in inputs if isinstance(item, str)]
    if len(texts) < len(inputs) and (body.prompt_name or body.instruction):
        message = "`prompt_name` and `instruction` apply to texts; token ids are embedded as sent"
        raise InputError(message, param="prompt_name" if body.prompt_name else "instruction")
    if body.prompt_name is not None:
        inputs = prompted(t.cast(list[str], inputs), body.prompt_name, served)  # all texts (checked above)
    vectors, _ = await served.engine.embed_inputs(
        inputs,
        body.instruction,
        body.dimensions,
        truncate=body.truncate is not False,
        truncation_direction=body.truncation_direction.lower(),
        names=names,
    )
    return vectors


async def similarity(served: Served, request: Request) -> list[float]:
    """TEI's sentence similarity: the cosine of each sentence's vector with the source sentence's."""
    body = await read_json(request, SimilarityRequest)
    parameters = body.parameters or SimilarityParameters()
    source = require_text(body.inputs.source_sentence, "inputs.source_sentence")
    limit = served.engine.config.max_items_per_request
    sentences = require_texts(body.inputs.sentences, "inputs.sentences", max(limit - 1, 1))  # + the source: TEI's
    names = ["inputs.source_sentence", *(f"inputs.sentences[{index}]" for index in range(len(sentences)))]
    vectors, _ = await served.engine.embed_counted(
        prompted([source, *sentences], parameters.prompt_name, served),
        truncate=parameters.truncate is not False,
        truncation_direction=parameters.truncation_direction.lower(),
        names=names,
    )
    first = vectors[0]
    return [sum(a * b for a, b in zip(first, other, strict=True)) for other in vectors[1:]]  # unit vectors


async def tokenize(served: Served, request: Request) -> list[list[dict[str, t.Any]]]:
    body = await read_json(request, TokenizeRequest)
    texts, names = texts_and_names(body.inputs, served.engine.config.max_items_per_request)
    engine = served.engine
    if served.spec.kind == "rerank":  # the tokenizer's tokens of the text itself (a pair's prompt is the runner's)
        if body.prompt_name or body.instruction:
            raise InputError("`prompt_name` and `instruction` are for the embedding services", param="prompt_name")
        prompts, encoded = texts, await engine.tokenize_texts(texts, add_special_tokens=body.add_special_tokens)
    else:
        prompts = engine.prompts(prompted(texts, body.prompt_name, served), body.instruction)
        encoded = await engine.tokenize(prompts, names, truncation_direction=body.truncation_direction.lower())
    answer = []
    for prompt, item in zip(prompts, encoded, strict=True):
        tokens = []
        for token_id, token, special, offsets in zip(
            item["ids"], item["tokens"], item["special"], item["offsets"], strict=True
        ):
            if special and not body.add_special_tokens:
                continue
            start, stop = offsets if offsets is not None else (None, None)
            text = token if offsets is None else prompt[start:stop]
            tokens.append({"id": token_id, "text": text, "special": special, "start": start, "stop": stop})
        answer.append(tokens)
    return answer


async def decode(served: Served, request: Request) -> list[str]:
    body = await read_json(request, DecodeRequest)
    single = all(isinstance(item, int) for item in body.ids)
    lists = [body.ids] if single else body.ids
    if single and not body.ids:
        raise InputError("`ids` must not be empty", kind="empty", param="ids")
    if not single:
        require_items(lists, "ids", served.engine.config.max_items_per_request)
    names = ["ids"] if single else [f"ids[{index}]" for index in range(len(lists))]
    return await served.engine.decode(lists, names, skip_special_tokens=body.skip_special_tokens)


async def rerank(served: Served, request: Request) -> list[dict[str, t.Any]]:
    body = await read_json(request, RerankRequest)
    require_text(body.query, "query")
    if not body.texts:
        raise InputError("`texts` cannot be empty", kind="empty", param="texts")
    require_items(body.texts, "texts", served.engine.config.max_items_per_request)
    if body.truncate is False or body.truncation_direction.lower() != "right":
        message = (
            "this reranker always fits a pair by cutting the end of its query/document part: "
            "`truncate: false` and `truncation_direction: left` are not available"
        )
        raise InputError(message, param="truncate" if body.truncate is False else "truncation_direction")
    ranked = await served.engine.rank(body.query, body.texts, body.instruction, raw=body.raw_scores)
    answer = []
    for index, score in ranked:
        rank: dict[str, t.Any] = {"index": index, "score": score}
        if body.return_text:
            rank["text"] = body.texts[index]
        answer.append(rank)
    return answer


async def info(served: Served, request: Request) -> dict[str, t.Any]:
    engine = served.engine
    described = engine.describe()
    if served.spec.kind == "rerank":  # a one-label classifier: the relevance of the pair (TEI's rerankers say so)
        model_type: dict[str, t.Any] = {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    else:
        model_type = {"embedding": {"pooling": described["pooling"]}}
    return {
        "model_id": served.spec.seed_name,
        "model_sha": None,
        "model_dtype": described["dtype"],
        "served_model_name": served.spec.seed_name,
        "model_type": model_type,
        "max_concurrent_requests": engine.config.max_queued_items,
        "max_input_length": engine.max_length,
        "max_batch_tokens": engine.config.max_batch_tokens,
        "max_batch_requests": None,
        "max_client_batch_size": engine.config.max_items_per_request,
        "auto_truncate": True,  # a text over max_input_length is cut unless the request says truncate=false
        "tokenization_workers": 1,
        "version": TEI_VERSION,
        "sha": None,
        "docker_label": None,
        "prompts": getattr(engine, "named_prompts", None) or None,
    }


NOT_THIS_MODEL = {
    "/embed": "Model is not an embedding model",
    "/similarity": "Model is not an embedding model",
    "/embed_all": "Model is not an embedding model served with its token embeddings: `embed_all` is not available",
    "/embed_sparse": "Model is not an embedding model with SPLADE pooling",
    "/predict": "Model is not a classifier model",
}


def not_this_model(paths: list[str]) -> list[Endpoint]:
    """TEI's answer on a route its other model types serve: 424, error_type Backend (its own messages)."""

    def refuse(path: str) -> t.Callable[[Served, Request], t.Awaitable[JSONResponse]]:
        async def handler(served: Served, request: Request) -> JSONResponse:
            status, error_type = TEI_ERRORS["not_this_model"]
            return TEI_PROTOCOL.error(status, NOT_THIS_MODEL[path], error_type=error_type)

        return handler

    return [Endpoint(path, "POST", refuse(path), operation=operation(None, None, 424)) for path in paths]


# -- what GET /docs.json declares for these routes (TEI's schemas, as these routes take and answer them) --------

STRING = {"type": "string"}
FLAG = {"type": "boolean"}
OPTIONAL_FLAG = {"type": "boolean", "nullable": True}
OPTIONAL_STRING = {"type": "string", "nullable": True}
IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
DIRECTION = {"type": "string", "enum": ["Left", "Right", "left", "right"]}


def request_schema(required: list[str], properties: dict[str, t.Any]) -> dict[str, t.Any]:
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": False}


EMBED_REQUEST = request_schema(
    ["inputs"],
    {
        "inputs": {"oneOf": [STRING, IDS, {"type": "array", "items": {"oneOf": [STRING, IDS]}}]},
        "normalize": FLAG,
        "truncate": OPTIONAL_FLAG,
        "truncation_direction": DIRECTION,
        "prompt_name": OPTIONAL_STRING,
        "dimensions": {"type": "integer", "nullable": True},
        "instruction": OPTIONAL_STRING,
        "encoding_format": {"type": "string", "enum": ["float"], "nullable": True},
    },
)
TOKENIZE_REQUEST = request_schema(
    ["inputs"],
    {
        "inputs": {"oneOf": [STRING, {"type": "array", "items": STRING}]},
        "add_special_tokens": FLAG,
        "prompt_name": OPTIONAL_STRING,
        "truncation_direction": DIRECTION,
        "instruction": OPTIONAL_STRING,
    },
)
DECODE_REQUEST = request_schema(
    ["ids"], {"ids": {"oneOf": [IDS, {"type": "array", "items": IDS}]}, "skip_special_tokens": FLAG}
)
SIMILARITY_REQUEST = request_schema(
    ["inputs"],
    {
        "inputs": request_schema(
            ["source_sentence", "sentences"],
            {"source_sentence": STRING, "sentences": {"type": "array", "items": STRING}},
        ),
        "parameters": {
            **request_schema(
                [], {"prompt_name": OPTIONAL_STRING, "truncate": OPTIONAL_FLAG, "truncation_direction": DIRECTION}
            ),
            "nullable": True,
        },
    },
)
RERANK_REQUEST = request_schema(
    ["query", "texts"],
    {
        "query": STRING,
        "texts": {"type": "array", "items": STRING},
        "raw_scores": FLAG,
        "return_text": FLAG,
        "truncate": OPTIONAL_FLAG,
        "truncation_direction": DIRECTION,
        "instruction": OPTIONAL_STRING,
    },
)
EMBEDDINGS = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
SCORES = {"type": "array", "items": {"type": "number"}}
TEXTS = {"type": "array", "items": STRING}
TOKENS = {
    "type": "array",
    "items": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["id", "text", "special"],
            "properties": {
                "id": {"type": "integer", "minimum": 0},
                "text": STRING,
                "special": FLAG,
                "start": {"type": "integer", "minimum": 0, "nullable": True},
                "stop": {"type": "integer", "minimum": 0, "nullable": True},
            },
        },
    },
}
RANKS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["index", "score"],
        "properties": {"index": {"type": "integer", "minimum": 0}, "score": {"type": "number"}, "text": STRING},
    },
}
INFO = {
    "type": "object",
    "required": [
        "model_id",
        "model_dtype",
        "served_model_name",
        "model_type",
        "max_concurrent_requests",
        "max_input_length",
        "max_batch_tokens",
        "max_client_batch_size",
        "auto_truncate",
        "tokenization_workers",
        "version",
    ],  # fmt: skip
    "properties": {"model_type": {"type": "object"}, "auto_truncate": FLAG, "version": STRING},
}
TEXT = (400, 413, 422, 429)
TEI_ERROR_KINDS = ["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]  # TEI's ErrorType
TEI_ERROR_SCHEMA = {
    "type": "object",
    "title": "TeiErrorResponse",
    "required": ["error", "error_type"],
    "properties": {
        "error": STRING,
        "error_type": {"type": "string", "enum": TEI_ERROR_KINDS},
    },
}


def operation(request: dict[str, t.Any] | None, answer: dict[str, t.Any] | None, *errors: int) -> dict[str, t.Any]:
    """An OpenAPI operation: its JSON request body, its 200 answer, and its error answers in TEI's shape (415 for a
    body that is not JSON, as on every route)."""
    statuses = sorted({*errors, 415} if request is not None or errors else set(errors))
    responses: dict[str, t.Any] = {}
    if answer is not None:
        responses["200"] = {"description": "OK", "content": {"application/json": {"schema": answer}}}
    for status in statuses:
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/TeiErrorResponse"}}}
        responses[str(status)] = {"description": f"TEI error {status}", "content": content}
    result: dict[str, t.Any] = {"tags": ["Text Embeddings Inference"], "responses": responses}
    if request is not None:
        result["requestBody"] = {"required": True, "content": {"application/json": {"schema": request}}}
    return result
