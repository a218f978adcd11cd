"""What the HTTP layer may call on a runner, per kind: small typed protocols that the services and the
protocol routes hold their runner as. A new model kind is a runner that satisfies one of these, plus a
row in embed_core/table.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Union

if TYPE_CHECKING:  # annotations only: importing this module imports no torch
    from embed_core.config import RunnerConfig

    from .batching import Batcher
    from .images import ImageSettings

# What one image may arrive as: the file's bytes, or base64 / a data: URI as text.
ImageSource = Union[bytes, str]


class Runner(Protocol):
    """Every runner: its settings, its queue (the service attaches the metrics to it), /health's details."""

    config: RunnerConfig
    batcher: Batcher[Any, Any]

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Embedder(Runner, Protocol):
    """What /v1/embeddings calls: vectors for texts, and the tokens the model read."""

    async def embed_counted(
        self, texts: list[str], instruction: str | None = None, dimensions: int | None = None
    ) -> tuple[list[list[float]], int]: ...


class TextEncoder(Embedder, Protocol):
    """A text embedding model (BGE, Qwen3-Embedding): L2-normalized vectors in input order."""

    async def embed(
        self, texts: list[str], instruction: str | None = None, dimensions: int | None = None
    ) -> list[list[float]]: ...

    async def embed_counted(
        self,
        texts: list[str],
        instruction: str | None = None,
        dimensions: int | None = None,
        truncate: bool = True,
        truncation_direction: str = "right",
        names: list[str] | None = None,
    ) -> tuple[list[list[float]], int]: ...

    async def embed_inputs(
        self,
        inputs: list[str | list[int]],
        instruction: str | None = None,
        dimensions: int | None = None,
        truncate: bool = True,
        truncation_direction: str = "right",
        names: list[str] | None = None,
    ) -> tuple[list[list[float]], int]: ...

    async def decode(self, lists: list[list[int]], names: list[str], skip_special_tokens: bool = True) -> list[str]: ...

    named_prompts: dict[str, str]  # the model's own sentence-transformers prompts, by name
    max_length: int

    def prompts(self, texts: list[str], instruction: str | None = None) -> list[str]: ...

    async def tokenize(
        self,
        prompts: list[str],
        names: list[str] | None = None,
        truncate: bool = True,
        truncation_direction: str = "right",
    ) -> list[dict[str, Any]]: ...


class ImageEncoder(Embedder, Protocol):
    """An image-text model (SigLIP2): images and texts into one space, and its own match score."""

    settings: ImageSettings
    scale: float
    bias: float

    def check_image_count(self, count: int, param: str) -> None: ...

    async def embed_images(self, sources: list[ImageSource], names: list[str] | None = None) -> list[list[float]]: ...

    async def embed_texts(self, texts: list[str]) -> list[list[float]]: ...

    async def similarity(
        self, text: str, sources: list[ImageSource], names: list[str] | None = None
    ) -> list[dict[str, float]]: ...


class Ranker(Runner, Protocol):
    """A reranker: P(relevant) of each document for a query."""

    max_length: int

    async def score(
        self, query: str, documents: list[str], instruction: str | None = None, raw: bool = False
    ) -> list[float]: ...

    async def rank(
        self,
        query: str,
        documents: list[str],
        instruction: str | None = None,
        top_k: int | None = None,
        raw: bool = False,
    ) -> list[tuple[int, float]]: ...

    async def tokenize_texts(self, texts: list[str], add_special_tokens: bool = True) -> list[dict[str, Any]]: ...

    async def decode(self, lists: list[list[int]], names: list[str], skip_special_tokens: bool = True) -> list[str]: ...
