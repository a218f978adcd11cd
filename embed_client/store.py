"""The photo index: a Qdrant collection, one point per photo file.

Qdrant because one client library covers both ends: `QdrantClient(path=...)` is its local mode (an
embedded store in a folder, no server, installed from PyPI with the client), and
`QdrantClient(url=...)` talks to a Qdrant server or cluster with the same calls, so `--store` takes
either and nothing else changes. Each point carries two named vectors: `image` (SigLIP2) and, for
photos with a caption, `caption` (a text embedder).

A point's id is derived from the photo's absolute path (uuid5), so indexing the same file twice
overwrites its point: a resumed or repeated run can never duplicate a photo.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_STORE = os.environ.get("EMBED_PHOTO_STORE", str(Path("~/.cache/embed-photos/qdrant").expanduser()))
DEFAULT_COLLECTION = "photos"
IMAGE_VECTOR, CAPTION_VECTOR = "image", "caption"
_NAMESPACE = uuid.UUID("6a1f2e0c-5b7d-4c1e-9a8f-3d2b1c0e9f7a")


def point_id(path: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, path))


@dataclass
class PhotoRecord:
    """What the store knows of one photo file (its payload), and its vectors when they were asked for."""

    path: str  # absolute
    size: int
    mtime_ns: int
    sha256: str
    taken_at: str | None = None  # EXIF DateTimeOriginal, ISO 8601 without a zone (cameras write local time)
    caption: str | None = None
    vectors: dict[str, list[float]] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "sha256": self.sha256,
            "taken_at": self.taken_at,
            "caption": self.caption,
        }

    @classmethod
    def from_point(cls, payload: dict[str, Any], vector: Any = None) -> PhotoRecord:
        vectors = dict(vector) if isinstance(vector, dict) else {}
        return cls(
            path=payload["path"],
            size=int(payload["size"]),
            mtime_ns=int(payload["mtime_ns"]),
            sha256=payload["sha256"],
            taken_at=payload.get("taken_at"),
            caption=payload.get("caption"),
            vectors=vectors,
        )


@dataclass(frozen=True)
class StoreHit:
    record: PhotoRecord
    score: float


class StoreError(Exception):
    """The store could not be opened or used (a server that does not answer, a collection of another shape)."""


class PhotoStore:
    """One collection in a Qdrant store: a local folder, ":memory:", or a server's http(s) URL."""

    def __init__(self, location: str | os.PathLike = DEFAULT_STORE, collection: str = DEFAULT_COLLECTION) -> None:
        try:
            from qdrant_client import QdrantClient
        except ImportError:
            raise StoreError("the photo index needs qdrant-client: pip install 'embed-services[photos]'") from None

        self.location, self.collection = str(location), collection
        if self.location.startswith(("http://", "https://")):
            self._client = QdrantClient(url=self.location, api_key=os.environ.get("QDRANT_API_KEY") or None)
        elif self.location == ":memory:":
            self._client = QdrantClient(location=":memory:")
        else:
            Path(self.location).expanduser().mkdir(parents=True, exist_ok=True)
            self._client = QdrantClient(path=str(Path(self.location).expanduser()))
        try:
            self._exists = self._client.collection_exists(collection)
        except Exception as exc:  # httpx / grpc errors of a server that does not answer
            raise StoreError(f"the Qdrant store at {self.location} does not answer: {exc}") from exc

    def __enter__(self) -> PhotoStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    # -- shape -------------------------------------------------------------------------------------

    def vector_sizes(self) -> dict[str, int]:
        """The named vectors the collection has, and their sizes ({} before the first photo)."""
        if not self._exists:
            return {}
        vectors = self._client.get_collection(self.collection).config.params.vectors
        return {name: params.size for name, params in (vectors or {}).items()}  # type: ignore[union-attr]

    def ensure(self, image_size: int, caption_size: int | None) -> bool:
        """Create the collection for these vector sizes, or check that the existing one has them; True when
        it takes caption vectors (False: one created without them, which Qdrant cannot add later)."""
        from qdrant_client import models

        wanted = {IMAGE_VECTOR: image_size, CAPTION_VECTOR: caption_size}
        if self._exists:
            have = self.vector_sizes()
            for name, size in wanted.items():
                if size is not None and have.get(name) not in (None, size):
                    raise StoreError(
                        f"the collection {self.collection!r} in {self.location} holds {name} vectors of size "
                        f"{have[name]}, but the service gives {size}: index into another --store or --collection"
                    )
            return caption_size is not None and CAPTION_VECTOR in have
        config = {
            name: models.VectorParams(size=size, distance=models.Distance.COSINE)
            for name, size in wanted.items()
            if size is not None
        }
        self._client.create_collection(self.collection, vectors_config=config)
        if self.location.startswith(("http://", "https://")):  # (local mode has no payload indexes)
            self._client.create_payload_index(self.collection, "sha256", models.PayloadSchemaType.KEYWORD)
        self._exists = True
        return caption_size is not None

    # -- reading -----------------------------------------------------------------------------------

    def records(self, with_vectors: bool = False) -> Iterator[PhotoRecord]:
        if not self._exists:
            return
        offset = None
        while True:
            points, offset = self._client.scroll(
                self.collection, limit=512, offset=offset, with_payload=True, with_vectors=with_vectors
            )
            for point in points:
                yield PhotoRecord.from_point(point.payload or {}, point.vector)
            if offset is None:
                return

    def get(self, path: str, with_vectors: bool = True) -> PhotoRecord | None:
        if not self._exists:
            return None
        points = self._client.retrieve(self.collection, [point_id(path)], with_payload=True, with_vectors=with_vectors)
        return PhotoRecord.from_point(points[0].payload or {}, points[0].vector) if points else None

    def find_by_hash(self, sha256: str) -> PhotoRecord | None:
        """A photo with this content, with its vectors (a copy elsewhere in the library need not be embedded)."""
        from qdrant_client import models

        if not self._exists:
            return None
        match = models.Filter(must=[models.FieldCondition(key="sha256", match=models.MatchValue(value=sha256))])
        points, _ = self._client.scroll(
            self.collection, scroll_filter=match, limit=1, with_payload=True, with_vectors=True
        )
        return PhotoRecord.from_point(points[0].payload or {}, points[0].vector) if points else None

    def count(self, with_caption: bool = False) -> int:
        from qdrant_client import models

        if not self._exists:
            return 0
        query = None
        if with_caption:
            query = models.Filter(must_not=[models.IsEmptyCondition(is_empty=models.PayloadField(key="caption"))])
        return self._client.count(self.collection, count_filter=query, exact=True).count

    def search(self, vector: Sequence[float], using: str, limit: int) -> list[StoreHit]:
        if not self._exists:
            return []
        found = self._client.query_points(
            self.collection, query=list(vector), using=using, limit=limit, with_payload=True
        ).points
        return [StoreHit(PhotoRecord.from_point(point.payload or {}), float(point.score)) for point in found]

    # -- writing -----------------------------------------------------------------------------------

    def upsert(self, records: Iterable[PhotoRecord]) -> None:
        """Write photos (payload and whichever vectors they carry); a point with the same path is replaced."""
        from qdrant_client import models

        points = [models.PointStruct(id=point_id(r.path), vector=r.vectors, payload=r.payload()) for r in records]
        if points:
            self._client.upsert(self.collection, points=points, wait=True)

    def set_payload(self, record: PhotoRecord) -> None:
        """Update what is known of a file whose content has not changed (a touched file), keeping its vectors."""
        self._client.set_payload(self.collection, payload=record.payload(), points=[point_id(record.path)], wait=True)

    def delete(self, paths: Iterable[str]) -> None:
        from qdrant_client import models

        ids = [point_id(path) for path in paths]
        if ids and self._exists:
            self._client.delete(self.collection, points_selector=models.PointIdsList(points=ids), wait=True)
