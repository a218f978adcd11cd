"""Error answers: the runners' errors (InputError, Overloaded) to statuses, in two shapes.

The project's own routes answer `{"error", "param"}`; the OpenAI / Cohere-compatible routes answer
OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import functools
import typing as t

from starlette.responses import JSONResponse

from runners.errors import InputError, Overloaded

# OpenAI's error `type` and `code` for the statuses these routes answer with.
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
ERROR_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class ProtocolError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or ERROR_CODES.get(status)}}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(openai_error_body(status, message, param, code), status_code=status, headers=headers)


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


class Rejected:
    """Stands in for every field of a form body that could not be parsed; json_errors raises its error."""

    def __init__(self, error: InputError) -> None:
        self.error = error
