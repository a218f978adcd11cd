"""The errors a request can meet, by kind. They carry no HTTP: each wire protocol (embed_http/) maps a kind to
its own status, from one table (embed_http/errors.py STATUS, and a protocol's own differences)."""

from __future__ import annotations

from typing import Literal, get_args

# What is wrong with a request, in words the HTTP layer turns into statuses:
# bad_input: a malformed or wrong value; empty: an empty list of inputs; too_large: more items, bytes or pixels than
# allowed; too_long: a text over the model's max_length with truncation refused; bad_token: a token id the model's
# tokenizer does not have; unsupported_media_type: a body or image format not taken; not_found: a named thing (a
# model id) not served here.
InputKind = Literal["bad_input", "empty", "too_large", "too_long", "bad_token", "unsupported_media_type", "not_found"]
INPUT_KINDS: tuple[str, ...] = get_args(InputKind)


class InputError(ValueError):
    """The request itself is wrong (empty text, too many items, bad option); `kind` says how."""

    def __init__(self, message: str, *, kind: InputKind = "bad_input", param: str | None = None) -> None:
        super().__init__(message)
        assert kind in INPUT_KINDS, kind
        self.message = message
        self.kind = kind
        self.param = param


class ModelLoadError(RuntimeError):
    """The model named by the environment cannot be used. Raised at start-up, before serving."""


class Overloaded(RuntimeError):
    """The model cannot take this work (out of memory even alone, the queue is full, the model is not loaded yet).
    `retry_after` (seconds), when known, says when to try again."""

    kind = "overloaded"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
