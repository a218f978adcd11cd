"""Error answers, whatever the protocol: one table from each kind of failure to its status, and the helpers the
protocol adapters share. Each adapter (embed_http/seed.py, openai.py, cohere.py, tei.py) renders the answer in its
own shape, and may differ from the table where its protocol does (TEI answers an overloaded model with 429)."""

from __future__ import annotations

import json

from embed_core.errors import InputError, Overloaded

# The one table: each kind of failure a service answers (embed_core/errors.py names the runners' kinds), and its
# status on the seed's, OpenAI's and Cohere's routes.
STATUS: dict[str, int] = {
    "bad_input": 400,
    "empty": 400,
    "bad_token": 400,
    "unauthorized": 401,
    "not_found": 404,
    "too_large": 413,
    "too_long": 413,  # a text over max_length with truncate=false
    "unsupported_media_type": 415,
    "not_this_model": 424,  # a route of the protocol that this kind of model does not serve (TEI's own 424)
    "overloaded": 503,
}

KEY_REFUSED = "missing or wrong API key: send the header `Authorization: Bearer <key>`"


def retry_headers(exc: InputError | Overloaded) -> dict[str, str] | None:
    """Retry-After, when the runner knows how long to wait (a model loading again after an idle unload)."""
    retry_after = getattr(exc, "retry_after", None)
    return None if retry_after is None else {"Retry-After": str(retry_after)}


class Rejected:
    """Stands in for every field of a form body that could not be parsed; the seed's error guard raises its error."""

    def __init__(self, error: InputError) -> None:
        self.error = error


def json_object(body: bytes) -> dict | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def error_message(body: bytes, status: int) -> str:
    """The message inside an error body of any shape: {"error": str}, {"detail": ...}, or plain text."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    if isinstance(data, dict):
        for key in ("error", "detail", "message"):
            if key in data:
                value = data[key]
                if isinstance(value, dict) and isinstance(value.get("message"), str):
                    return value["message"]
                return value if isinstance(value, str) else json.dumps(value)
    return json.dumps(data)
