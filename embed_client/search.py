"""Search an indexed photo library with words (or with one of its photos).

    from embed_client import search
    for hit in search("orange cat on a sofa", top=10, rerank="http://localhost:6015"):
        print(hit.rank, hit.score, hit.path, hit.caption)

The query goes through SigLIP2's text tower and is matched against the photos' image vectors; where
the library has captions, it also goes through the caption embedder (with a query instruction) and is
matched against the caption vectors. Two candidate lists are merged by reciprocal-rank fusion
(score = sum over lists of 1 / (60 + rank), Cormack et al. 2009): rank-based, so the two models'
cosines, which live on different scales, need no calibration. With `rerank`, a reranker service
reorders the captioned candidates by their captions; a candidate without a caption keeps its place.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from . import EmbedClient, EmbedClientError
from .index import DEFAULT_SERVICE, DEFAULT_TEXT_SERVICE
from .store import CAPTION_VECTOR, DEFAULT_STORE, IMAGE_VECTOR, PhotoStore, StoreHit

RRF_K = 60  # the constant of Cormack et al.; it damps the weight of the very first ranks
# Qwen3-Embedding wants an instruction on queries (not on documents); blank it for a service that takes none.
CAPTION_QUERY_INSTRUCTION = "Given a photo search query, retrieve the captions of the photos that match it"


@dataclass(frozen=True)
class SearchHit:
    """One photo found. `score` is what ordered it: the reranker's P(relevant) when it was reranked,
    else the fused RRF score when two lists were merged, else the cosine with the query."""

    rank: int
    score: float
    path: str
    caption: str | None = None
    taken_at: str | None = None
    image_score: float | None = None  # cosine of the query's SigLIP2 vector with the photo's
    caption_score: float | None = None  # cosine of the query's text vector with the caption's
    rerank_score: float | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def fuse(lists: list[list[StoreHit]], k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion of ranked lists of hits: (path, score), best first; ties keep first-seen order."""
    scores: dict[str, float] = {}
    for hits in lists:
        for rank, hit in enumerate(hits, 1):
            scores[hit.record.path] = scores.get(hit.record.path, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])


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
    api_key: str | None = None,
    collection: str = "photos",
    timeout: float = 60.0,
) -> list[SearchHit]:
    """The `top` photos for a text `query`, or the photos most like the photo `like` (by its stored vector,
    or embedded now if it is not in the store). `candidates` (default 3 x top) is how many each list
    contributes to the fusion and the reranker. `using` limits the search to the photos' pictures ("image")
    or to their captions ("caption")."""
    if (query is None or not query.strip()) == (like is None):
        raise ValueError("give a non-empty query or a photo to search like, not both")
    if not set(using) <= {IMAGE_VECTOR, CAPTION_VECTOR} or not using:
        raise ValueError(f"using must name {IMAGE_VECTOR!r} and/or {CAPTION_VECTOR!r}, got {list(using)}")
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    api_key = api_key if api_key is not None else (os.environ.get("EMBED_API_KEY") or None)
    pool = max(top, candidates or 3 * top)
    owned = not isinstance(store, PhotoStore)
    photo_store = PhotoStore(store, collection) if owned else store  # type: ignore[arg-type]
    try:
        lists = []
        if IMAGE_VECTOR in using or like is not None:
            with EmbedClient(service, api_key=api_key, timeout=timeout) as images:
                by_photo = like is not None
                vector = _photo_vector(photo_store, images, like) if by_photo else images.get_embedding(query)  # type: ignore[arg-type]
            lists.append(photo_store.search(vector, IMAGE_VECTOR, pool))
        captioned = CAPTION_VECTOR in photo_store.vector_sizes() and photo_store.count(with_caption=True) > 0
        if query is not None and text_service and captioned and CAPTION_VECTOR in using:
            caption_hits = _caption_hits(photo_store, text_service, query, caption_instruction, api_key, pool)
            if caption_hits is not None:
                lists.append(caption_hits)
        if not lists:
            raise ValueError("nothing to search: the store holds no caption vectors (or no text service was given)")
        hits = _merge(lists, using_image=IMAGE_VECTOR in using or like is not None)[:pool]
    finally:
        if owned:
            photo_store.close()
    if rerank and query is not None:
        hits = _rerank(hits, query, rerank, api_key, timeout)
    return [replace(hit, rank=rank) for rank, hit in enumerate(hits[:top], 1)]


def _photo_vector(store: PhotoStore, images: EmbedClient, like: str | os.PathLike) -> list[float]:
    path = str(Path(like).expanduser().resolve())
    record = store.get(path)
    if record is not None and IMAGE_VECTOR in record.vectors:
        return record.vectors[IMAGE_VECTOR]
    return images.embed_image(path)


def _caption_hits(
    store: PhotoStore, url: str, query: str, instruction: str | None, api_key: str | None, pool: int
) -> list[StoreHit] | None:
    try:
        with EmbedClient(url, api_key=api_key) as texts:
            vector = texts.get_embedding(query, instruction or None)
    except EmbedClientError as exc:  # the photos are still searchable by their pictures
        warnings.warn(f"captions not searched: the text service at {url} failed: {exc}", stacklevel=3)
        return None
    return store.search(vector, CAPTION_VECTOR, pool)


def _merge(lists: list[list[StoreHit]], using_image: bool) -> list[SearchHit]:
    by_path = {}
    cosines: list[dict[str, float]] = [{hit.record.path: hit.score for hit in hits} for hits in lists]
    for hits in lists:
        for hit in hits:
            by_path.setdefault(hit.record.path, hit.record)
    ranked = fuse(lists) if len(lists) > 1 else [(hit.record.path, hit.score) for hit in lists[0]]
    image_cosines = cosines[0] if using_image else {}
    caption_cosines = cosines[-1] if len(lists) > 1 or not using_image else {}
    merged = []
    for path, score in ranked:
        record = by_path[path]
        merged.append(
            SearchHit(
                rank=0,
                score=score,
                path=path,
                caption=record.caption,
                taken_at=record.taken_at,
                image_score=image_cosines.get(path),
                caption_score=caption_cosines.get(path),
            )
        )
    return merged


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
