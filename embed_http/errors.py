"""Error answers: one table from each kind of failure to its status, and the two shapes they are sent in.

The project's own routes answer `{"error", "param"}`; the OpenAI / Cohere-compatible routes answer
OpenAI's `{"error": {"message", "type", "param", "code"}}` (middleware.ProtocolErrors turns the first
into the second on /v1/* and /v2/*, so every check can answer in the first).
"""

from __future__ import annotations

import functools
import typing as t

from starlette.responses import JSONResponse

from runners.errors import InputError, Overloaded

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


# -- the project's shape ------------------------------------------------------------------------------


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
            return error_response(status_of(exc), exc.message, exc.param)
        except Overloaded as exc:
            return error_response(status_of(exc), str(exc))

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


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == STATUS["unauthorized"] else None
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
            return openai_error(status_of(exc), str(exc), code="overloaded")

    return wrapper
