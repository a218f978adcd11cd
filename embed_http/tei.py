"""Hugging Face text-embeddings-inference (TEI)'s API on the text embedding services, for the clients built for
it (huggingface_hub's InferenceClient, LangChain's HuggingFaceEndpointEmbeddings, LlamaIndex's
TextEmbeddingsInference, Haystack's HF API embedders):

- `POST /embed`: {"inputs": str | [str], "normalize", "truncate", "truncation_direction", "prompt_name",
  "dimensions"} -> [[float, ...], ...];
- `POST /tokenize`: {"inputs", "add_special_tokens", "prompt_name"} -> [[{"id", "text", "special", "start",
  "stop"}, ...], ...], the tokens the model reads;
- `GET /info`: the model and its limits in TEI's shape;
- errors as TEI's {"error": str, "error_type": str} (embed_http/errors.py), a refused API key's too.

Differences from TEI, by design: a text over max_length is cut at the end unless `truncate` is false (TEI
refuses it unless started with --auto-truncate); vectors are always normalized (`normalize: false` is
refused); `instruction` (this project's task instruction) is accepted beside `prompt_name`. TEI's `/rerank`
is not served: the rerank services keep the seed's `/rerank`.
"""

from __future__ import annotations

import typing as t

import bentoml
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from embed_core.errors import InputError
from embed_http.errors import tei_errors
from embed_http.protocols import read_json
from embed_http.schemas import require_text, require_texts

TEI_VERSION = "1.8.0"  # the TEI API these routes follow (its /info reports a version; clients do not check it)

Direction = t.Literal["right", "left", "Right", "Left"]  # TEI takes both spellings


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is refused, not dropped

    inputs: t.Union[StrictStr, list[StrictStr]]
    normalize: StrictBool = True
    truncate: t.Optional[StrictBool] = None
    truncation_direction: Direction = "right"
    prompt_name: t.Optional[StrictStr] = None
    dimensions: t.Optional[StrictInt] = None
    instruction: t.Optional[StrictStr] = None  # not TEI's: the project's task instruction (Qwen3, BGE)
    encoding_format: t.Optional[t.Literal["float"]] = None  # huggingface_hub may send it; floats are what TEI gives


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: t.Union[StrictStr, list[StrictStr]]
    add_special_tokens: StrictBool = True
    prompt_name: t.Optional[StrictStr] = None
    truncation_direction: Direction = "right"
    instruction: t.Optional[StrictStr] = None


def tei_endpoint(
    handler: t.Callable[[Request, t.Any], t.Awaitable[t.Any]],
) -> t.Callable[[Request], t.Awaitable[Response]]:
    @tei_errors
    async def endpoint(request: Request) -> Response:
        return JSONResponse(await handler(request, bentoml.get_current_service()))

    return endpoint


def checked_inputs(inputs: str | list[str], service: t.Any) -> tuple[list[str], list[str]]:
    """The texts and their names (`inputs`, `inputs[3]`); blank ones refused with their index, as on the seed paths."""
    texts, names = (
        ([inputs], ["inputs"]) if isinstance(inputs, str) else (inputs, [f"inputs[{i}]" for i in range(len(inputs))])
    )
    if isinstance(inputs, str):
        require_text(inputs, "inputs")
    else:
        require_texts(texts, "inputs", service.engine.config.max_items_per_request)
    return texts, names


def prompted(texts: list[str], prompt_name: str | None, service: t.Any) -> list[str]:
    if prompt_name is None:
        return texts
    prompts = service.engine.named_prompts
    if prompt_name not in prompts:
        known = ", ".join(sorted(prompts)) or "none"
        raise InputError(
            f"`prompt_name` {prompt_name!r} is not one of the model's prompts ({known})", param="prompt_name"
        )
    return [prompts[prompt_name] + text for text in texts]  # as sentence-transformers: the prompt, then the text


async def embed(request: Request, service: t.Any) -> list[list[float]]:
    body = await read_json(request, EmbedRequest)
    if not body.normalize:
        raise InputError("`normalize`: this service returns normalized vectors only", param="normalize")
    texts, names = checked_inputs(body.inputs, service)
    vectors, _ = await service.engine.embed_counted(
        prompted(texts, body.prompt_name, service),
        body.instruction,
        body.dimensions,
        truncate=body.truncate is not False,
        truncation_direction=body.truncation_direction.lower(),
        names=names,
    )
    return vectors


async def tokenize(request: Request, service: t.Any) -> list[list[dict[str, t.Any]]]:
    body = await read_json(request, TokenizeRequest)
    texts, names = checked_inputs(body.inputs, service)
    engine = service.engine
    prompts = engine.prompts(prompted(texts, body.prompt_name, service), body.instruction)
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


async def info(request: Request, service: t.Any) -> dict[str, t.Any]:
    engine = service.engine
    described = engine.describe()
    return {
        "model_id": service.spec.seed_name,
        "model_sha": None,
        "model_dtype": described["dtype"],
        "model_type": {"embedding": {"pooling": described["pooling"]}},
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
        "prompts": engine.named_prompts or None,
    }


TEI_ROUTES = [
    Route("/embed", tei_endpoint(embed), methods=["POST"]),
    Route("/tokenize", tei_endpoint(tokenize), methods=["POST"]),
    Route("/info", tei_endpoint(info), methods=["GET"]),
]
