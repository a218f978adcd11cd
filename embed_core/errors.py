"""Errors the runners raise. They carry no HTTP; service.py maps them to status codes."""

from __future__ import annotations


class InputError(ValueError):
    """The request itself is wrong (empty text, too many items, bad option). Maps to 4xx."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


class ModelLoadError(RuntimeError):
    """The model named by the environment cannot be used. Raised at start-up, before serving."""


class Overloaded(RuntimeError):
    """The model cannot take this work (out of memory even alone, the queue is full, the model is not loaded yet).
    Maps to 503; `retry_after` (seconds), when known, to its Retry-After header."""

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
