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
    """The model cannot take this work right now (out of memory even alone, queue full). Maps to 503."""
