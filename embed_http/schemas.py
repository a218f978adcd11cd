"""The services' request field types, their checks, and their answer models.

The field types declare in the OpenAPI document what the checks below enforce; the checks raise
InputError naming the field, and every route (the seed paths and the protocol routes) calls them.
"""

from __future__ import annotations

import typing as t

from pydantic import BaseModel, Field

from embed_core.errors import InputError

# What require_text / require_texts enforce, declared in the OpenAPI document too (schema only: the
# checks themselves stay in those functions, whose errors name the field at fault).
NonBlankText = t.Annotated[str, Field(json_schema_extra={"minLength": 1, "pattern": r"\S"})]
NonBlankTexts = t.Annotated[list[NonBlankText], Field(json_schema_extra={"minItems": 1})]
# Strict: pydantic would otherwise take true as 1 and "256" or 256.0 as 256.
Dimensions = t.Optional[t.Annotated[int, Field(strict=True)]]
# The same for top_k (true would be top_k=1) and return_documents ("no" or 0 would be false).
TopK = t.Optional[t.Annotated[int, Field(strict=True, json_schema_extra={"minimum": 1})]]
Flag = t.Annotated[bool, Field(strict=True)]
# Rerank documents may be empty strings: an empty caption is still a document, and is scored.
Documents = t.Annotated[list[str], Field(json_schema_extra={"minItems": 1})]


class EmbeddingResponse(BaseModel):
    embedding: list[float]
    dimension: int


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]
    dimension: int


class RerankResult(BaseModel):
    original_index: int
    score: float
    # Left out of the JSON (not null) when the request says return_documents=false.
    document: t.Optional[str] = Field(default=None, exclude_if=lambda value: value is None)


class RerankResponse(BaseModel):
    results: list[RerankResult]


class ScoreResponse(BaseModel):
    score: float


def require_text(value: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"`{name}` must be a non-empty string", param=name)
    return value


def require_items(values: list[t.Any], name: str, limit: int) -> list[t.Any]:
    """A non-empty list of at most `limit` items (strings, which may be blank: rerank documents)."""
    if not isinstance(values, list) or not values:
        kind = "empty" if isinstance(values, list) else "bad_input"
        raise InputError(f"`{name}` must be a non-empty list of strings", kind=kind, param=name)
    if len(values) > limit:
        raise InputError(
            f"`{name}` holds {len(values)} items; at most {limit} per request", kind="too_large", param=name
        )
    return values


def require_texts(values: list[str], name: str, limit: int) -> list[str]:
    for index, value in enumerate(require_items(values, name, limit)):
        require_text(value, f"{name}[{index}]")
    return values


def require_positive(value: int | None, name: str) -> int | None:
    """An optional count (top_k, top_n): absent, or at least 1."""
    if value is not None and value < 1:
        raise InputError(f"`{name}` must be at least 1, got {value}", param=name)
    return value


class Score(BaseModel):
    index: int  # position of the image in the request
    score: float  # sigmoid(cosine * scale + bias): SigLIP's probability that text and image match
    cosine: float


class SimilarityResponse(BaseModel):
    scores: list[Score]  # in input order
    scale: float
    bias: float
