"""Search an indexed photo library with words (or with a photo, in the library or not).

    from embed_client import search
    for hit in search("orange cat on a sofa", top=10, after="2019", rerank="http://localhost:6015"):
        print(hit.rank, hit.match, hit.path, hit.copies)

The query goes through SigLIP2's text tower and is matched against the photos' image vectors; where
the library has captions, it also goes through the caption embedder (with a query instruction) and is
matched against the caption vectors. The store's engine merges the two candidate lists by reciprocal-rank
fusion (score = sum over lists of 1 / (60 + rank), Cormack et al. 2009): rank-based, so the two models'
cosines, which live on different scales, need no calibration. Capture-date bounds (`after`, `before`) are
filters the engine serves from its payload index. Exact copies of a photo (the same SHA-256) are one
result that lists the other copies' paths. With `rerank`, a reranker service reorders the captioned
candidates by their captions; a candidate without a caption keeps its place.

Each hit's `match` is SigLIP's own answer to "does this photo show these words": the sigmoid of the
cosine times the model's logit scale plus its bias (both from the service's /health), the probability
the model was trained to output. A raw SigLIP cosine of a good match is ~0.1-0.2, meaningless alone.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .client import EmbedClient, EmbedClientError
from .index import DEFAULT_SERVICE, DEFAULT_TEXT_SERVICE
from .store import (
    CAPTION_VECTOR,
    DEFAULT_STORE,
    DEFAULT_WAIT,
    IMAGE_VECTOR,
    RRF_K,
    PhotoStore,
    QueryResult,
    date_bound,
)

__all__ = ["CAPTION_QUERY_INSTRUCTION", "RRF_K", "SearchHit", "search", "siglip_match"]

# Qwen3-Embedding wants an instruction on queries (not on documents); blank it for a service that takes none.
CAPTION_QUERY_INSTRUCTION = "Given a photo search query, retrieve the captions of the photos that match it"


@dataclass(frozen=True)
class SearchHit:
    """One photo found. `score` is what ordered it: the reranker's P(relevant) when it was reranked, else
    the engine's RRF score when two lists were fused, else the cosine with the query. `match` is SigLIP's
    probability that the photo shows the words (text queries; None for a search by photo). `copies` are the
    other paths with the same content."""

    rank: int
    score: float
    path: str
    caption: str | None = None
    taken_at: str | None = None
    match: float | None = None
    image_score: float | None = None  # cosine of the query's SigLIP2 vector with the photo's
    caption_score: float | None = None  # cosine of the query's text vector with the caption's
    rerank_score: float | None = None
    copies: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        found = asdict(self)
        found["copies"] = list(self.copies)
        return found


def siglip_match(cosine: float, scale: float, bias: float) -> float:
    """SigLIP's sigmoid: the model's probability that an image and a text belong together."""
    return 1.0 / (1.0 + math.exp(-(cosine * scale + bias)))


def search(
    query: str | None = None,
    *,
    like: str | os.PathLike | None = None,
    store: str | os.PathLike | PhotoStore = DEFAULT_STORE,
    service: str = DEFAULT_SERVICE,
    text_service: str | None = DEFAULT_TEXT_SERVICE,
    caption_instruction: str | None = CAPTION_QUERY_INSTRUCTION,
    top: int = 20,
    rerank: str | None = None,
    candidates: int | None = None,
    using: Sequence[str] = (IMAGE_VECTOR, CAPTION_VECTOR),
    after: str | None = None,
    before: str | None = None,
    api_key: str | None = None,
    collection: str = "photos",
    timeout: float = 60.0,
    wait: float = DEFAULT_WAIT,
    notify: Callable[[str], None] | None = None,
) -> list[SearchHit]:
    """The `top` photos for a text `query`, or the photos most like the photo `like` (its stored vector, or
    embedded now when it is not in the store). `candidates` (default 3 x top) is how many each list
    contributes to the fusion and the reranker. `using` limits the search to the photos' pictures ("image")
    or to their captions ("caption"). `after` (inclusive) and `before` (exclusive) bound the EXIF capture
    date ("2019", "2019-07", "2019-07-14" or a timestamp); photos without one are left out then. `wait`:
    seconds to wait for an indexing run to hand the store over (`notify` is told when that happens)."""
    if (query is None or not query.strip()) == (like is None):
        raise ValueError("give a non-empty query or a photo to search like, not both")
    if not set(using) <= {IMAGE_VECTOR, CAPTION_VECTOR} or not using:
        raise ValueError(f"using must name {IMAGE_VECTOR!r} and/or {CAPTION_VECTOR!r}, got {list(using)}")
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    after, before = date_bound(after), date_bound(before)
    if after is not None and before is not None and after >= before:
        raise ValueError(f"nothing is taken after {after} and before {before}")
    api_key = api_key if api_key is not None else (os.environ.get("EMBED_API_KEY") or None)
    pool = max(top, candidates or 3 * top)
    image_vector = caption_vector = None
    scale_bias: tuple[float, float] | None = None
    with EmbedClient(service, api_key=api_key, timeout=timeout) as images:  # the query first: the store waits
        if like is not None:
            path = Path(like).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"{like}: no such photo")
        elif IMAGE_VECTOR in using:
            image_vector = images.get_embedding(query)  # type: ignore[arg-type]
            health = images.health()
            if "scale" in health and "bias" in health:
                scale_bias = float(health["scale"]), float(health["bias"])
        owned = not isinstance(store, PhotoStore)
        photo_store = (
            PhotoStore(store, collection, create=False, role="search", wait=wait, notify=notify) if owned else store
        )  # type: ignore[arg-type]
        try:
            if like is not None:
                image_vector = _photo_vector(photo_store, images, path)
            captioned = CAPTION_VECTOR in photo_store.vector_sizes() and photo_store.count(with_caption=True) > 0
            if query is not None and text_service and captioned and CAPTION_VECTOR in using:
                caption_vector = _caption_vector(text_service, query, caption_instruction, api_key)
            if image_vector is None and caption_vector is None:
                raise ValueError("nothing to search: the store holds no caption vectors (or no text service was given)")
            found = photo_store.query(
                image=image_vector, caption=caption_vector, limit=pool, pool=pool, after=after, before=before
            )
            hits = _hits(found, scale_bias)
            copies = photo_store.copies(sha256 for sha256, _ in hits)
        finally:
            if owned:
                photo_store.close()
    listed = [replace(hit, copies=tuple(p for p in copies.get(sha256, ()) if p != hit.path)) for sha256, hit in hits]
    if rerank and query is not None:
        listed = _rerank(listed, query, rerank, api_key, timeout)
    return [replace(hit, rank=rank) for rank, hit in enumerate(listed[:top], 1)]


def _photo_vector(store: PhotoStore, images: EmbedClient, path: Path) -> list[float]:
    """A photo's stored vector, or the service's for a photo outside the library."""
    record = store.get(str(path))
    if record is not None and IMAGE_VECTOR in record.vectors:
        return record.vectors[IMAGE_VECTOR]
    return images.embed_image(path)


def _caption_vector(url: str, query: str, instruction: str | None, api_key: str | None) -> list[float] | None:
    try:
        with EmbedClient(url, api_key=api_key) as texts:
            return texts.get_embedding(query, instruction or None)
    except EmbedClientError as exc:  # the photos are still searchable by their pictures
        warnings.warn(f"captions not searched: the text service at {url} failed: {exc}", stacklevel=4)
        return None


def _hits(found: QueryResult, scale_bias: tuple[float, float] | None) -> list[tuple[str, SearchHit]]:
    """The engine's ranking, one hit per content (a copy's later places dropped), with each list's cosine."""
    image = {hit.record.path: hit.score for hit in found.image}
    caption = {hit.record.path: hit.score for hit in found.caption}
    hits, seen = [], set()
    for hit in found.fused:
        record = hit.record
        if record.sha256 in seen:
            continue
        seen.add(record.sha256)
        cosine = image.get(record.path)
        match = siglip_match(cosine, *scale_bias) if cosine is not None and scale_bias else None
        hits.append(
            (
                record.sha256,
                SearchHit(
                    rank=0,
                    score=hit.score,
                    path=record.path,
                    caption=record.caption,
                    taken_at=record.taken_at,
                    match=match,
                    image_score=cosine,
                    caption_score=caption.get(record.path),
                ),
            )
        )
    return hits


def _rerank(hits: list[SearchHit], query: str, url: str, api_key: str | None, timeout: float) -> list[SearchHit]:
    """The captioned candidates, reordered by the reranker within the places they held."""
    slots = [index for index, hit in enumerate(hits) if hit.caption]
    if not slots:
        return hits
    with EmbedClient(url, api_key=api_key, timeout=timeout) as reranker:
        ranked = reranker.rerank(query, [hits[index].caption or "" for index in slots], return_documents=False)
    reordered = list(hits)
    for slot, result in zip(slots, ranked, strict=True):
        hit = hits[slots[result.original_index]]
        reordered[slot] = replace(hit, score=result.score, rerank_score=result.score)
    return reordered
