"""Error answers: one table from each kind of failure to its status, and the three shapes they are sent in.

The project's own routes answer `{"error", "param"}`; the OpenAI / Cohere-compatible routes answer
OpenAI's `{"error": {"message", "type", "param", "code"}}` (middleware.ProtocolErrors turns the first
into the second on /v1/* and /v2/*, so every check can answer in the first); TEI's routes (embed_http/tei.py)
answer TEI's `{"error", "error_type"}`. `refused_key` picks the shape by path, for the API-key check, which
answers before any route is chosen.
"""

from __future__ import annotations

import functools
import typing as t

from starlette.responses import JSONResponse

from embed_core.errors import InputError, Overloaded

# The one table: each kind of failure a service answers, and its status. The runners' InputError names
# its own kind (bad input, or too many items for one request).
STATUS: dict[str, int] = {
    "bad_input": 400,
    "unauthorized": 401,
    "not_found": 404,
    "too_large": 413,
    "unsupported_media_type": 415,
    "overloaded": 503,
}

# OpenAI's error `type` and `code` for each status (its clients parse them).
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
OPENAI_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def status_of(exc: InputError | Overloaded) -> int:
    """The status of a runner's error: the table's, by kind."""
    return exc.status if isinstance(exc, InputError) else STATUS["overloaded"]


def retry_headers(exc: Overloaded) -> dict[str, str] | None:
    """Retry-After, when the runner knows how long to wait (a model loading again after an idle unload)."""
    return None if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}


# -- the project's shape ------------------------------------------------------------------------------


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, t.Any] = {"error": message}
    if param is not None:
        body["param"] = param
    return JSONResponse(body, status_code=status, headers=headers)


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
            return error_response(status_of(exc), exc.message, exc.param)
        except Overloaded as exc:
            return error_response(status_of(exc), str(exc), headers=retry_headers(exc))

    return wrapper


class Rejected:
    """Stands in for every field of a form body that could not be parsed; json_errors raises its error."""

    def __init__(self, error: InputError) -> None:
        self.error = error


# -- OpenAI's shape -----------------------------------------------------------------------------------


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": message, "type": kind, "param": param, "code": code or OPENAI_CODES.get(status)}
    # `detail` too: Jina's clients (LlamaIndex and LangChain's JinaRerank) raise RuntimeError(body["detail"]).
    return {"error": error, "detail": message}


def openai_error(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    if status == STATUS["unauthorized"]:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(openai_error_body(status, message, param, code), status_code=status, headers=headers)


def openai_errors(
    handler: t.Callable[..., t.Awaitable[t.Any]],
) -> t.Callable[..., t.Awaitable[t.Any]]:
    """json_errors for the protocol routes: the same errors, in OpenAI's shape."""

    @functools.wraps(handler)
    async def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        try:
            return await handler(*args, **kwargs)
        except InputError as exc:
            return openai_error(status_of(exc), exc.message, exc.param)
        except Overloaded as exc:
            return openai_error(status_of(exc), str(exc), code="overloaded", headers=retry_headers(exc))

    return wrapper


# -- TEI's shape (text-embeddings-inference's ErrorResponse) -------------------------------------------

TEI_PATHS = frozenset({"/embed", "/tokenize", "/info"})  # embed_http/tei.py serves them
# TEI's error_type for each status its routes answer with: its own kinds (router/src/lib.rs, ErrorType), and
# "Unauthorized" for a refused key, which TEI answers with a bare 401 and no body (no kind of its own to follow).
TEI_ERROR_TYPES = {400: "Validation", 401: "Unauthorized", 413: "Validation", 422: "Tokenizer", 503: "Overloaded"}


def tei_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": message, "error_type": TEI_ERROR_TYPES.get(status, "Validation")}
    return JSONResponse(body, status_code=status, headers=headers)


def tei_errors(handler: t.Callable[..., t.Awaitable[t.Any]]) -> t.Callable[..., t.Awaitable[t.Any]]:
    """json_errors for TEI's routes: the same errors, in TEI's shape."""

    @functools.wraps(handler)
    async def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        try:
            return await handler(*args, **kwargs)
        except InputError as exc:
            return tei_error(status_of(exc), exc.message)
        except Overloaded as exc:
            return tei_error(status_of(exc), str(exc), headers=retry_headers(exc))

    return wrapper


# -- the API key's refusal, in the shape of the route it was meant for -----------------------------------

KEY_REFUSED = "missing or wrong API key: send the header `Authorization: Bearer <key>`"
PROTOCOL_PREFIXES = ("/v1/", "/v2/")


def refused_key(path: str) -> JSONResponse:
    status, challenge = STATUS["unauthorized"], {"WWW-Authenticate": "Bearer"}
    if path in TEI_PATHS:
        return tei_error(status, KEY_REFUSED, headers=challenge)
    if path.startswith(PROTOCOL_PREFIXES):
        return openai_error(status, KEY_REFUSED)
    return JSONResponse({"error": KEY_REFUSED}, status_code=status, headers=challenge)
