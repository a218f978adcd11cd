"""The seed's own protocol: the paths of the seed README (/embed/text, /rerank, ...), answered as
`{"error": str, "param"?: str}` on failure.

Its routes are the BentoML APIs of service.py (BentoML validates their JSON against the signature's types); this
adapter is the default of the registry: a path that no other protocol claims answers in this shape.
"""

from __future__ import annotations

import functools
import typing as t

from starlette.responses import JSONResponse

from embed_core.errors import InputError, Overloaded
from embed_http.adapter import Adapter
from embed_http.errors import Rejected, json_object


class Seed(Adapter):
    name = "seed"

    def error(
        self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        body: dict[str, t.Any] = {"error": message}
        if param is not None:
            body["param"] = param
        return JSONResponse(body, status_code=status, headers=headers)

    def is_error_shaped(self, body: bytes) -> bool:
        data = json_object(body)
        return data is not None and isinstance(data.get("error"), str)


SEED = Seed()


def json_errors(api: t.Callable[..., t.Awaitable[t.Any]]) -> t.Callable[..., t.Awaitable[t.Any]]:
    """A BentoML API's guard: the runners' errors as the seed's JSON 4xx/503 answers. (Malformed or wrongly typed
    JSON never gets this far: BentoML's pydantic validation answers it with a 400 and a JSON error.)"""

    @functools.wraps(api)
    async def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        try:
            for value in kwargs.values():
                if isinstance(value, Rejected):  # a form body that could not be read at all (see FormOrJSON)
                    raise value.error
            return await api(*args, **kwargs)
        except (InputError, Overloaded) as exc:
            return SEED.answer(exc)

    return wrapper
