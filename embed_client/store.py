"""The photo index: one point per photo file, in Qdrant Edge (a folder) or on a Qdrant server (a URL).

A folder is a Qdrant Edge shard: Qdrant's own engine embedded in this process (HNSW over int8-quantized
vectors kept in memory, the float32 originals on disk for rescoring, payload indexes on the capture date
and the content hash), the same segment format and data model as a Qdrant server. A URL is a Qdrant
server's collection, reached with qdrant-client: the same named vectors and payload, so an index moves
from one to the other by copying its points (`copy_store`), never by embedding a photo again.

Each point carries two named vectors: `image` (SigLIP2) and, for photos with a caption, `caption` (a
text embedder). Its id is derived from the photo's absolute path (uuid5), so indexing the same file twice
overwrites its point: a resumed or repeated run can never duplicate a photo. A file the service refused
is a point without vectors whose payload says why (`error`), so that it is not sent again while unchanged.

One process at a time has a folder open (the engine's rule: its write-ahead log is locked). The owner
writes who it is into `<collection>.lock`; a search that finds an indexing run there queues up, and the
indexer hands the store over between two batches (`hand_over`), then takes it back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import pickle
import re
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_STORE = os.environ.get("EMBED_PHOTO_STORE", str(Path("~/.cache/embed-photos/qdrant").expanduser()))
DEFAULT_COLLECTION = "photos"
IMAGE_VECTOR, CAPTION_VECTOR = "image", "caption"
RRF_K = 60  # reciprocal-rank fusion: 1/(60 + rank), ranks from 1 (Cormack et al. 2009)
ENGINE_RRF_K = RRF_K + 1  # Qdrant scores 1/(k + position), positions from 0: k = 61 is 1/(60 + rank)
OVERSAMPLING = 2.0  # int8 candidates rescored with the float32 vectors per result: recall@20 0.98 -> 1.0 at 20,000
HNSW_EF = 128  # candidates the HNSW walk keeps: recall@20 >= 0.99 at 100,000 photos (BENCHMARKS.md)
DEFAULT_WAIT = 120.0  # seconds a search waits for an indexing run to hand the store over
EDGE_FOLDER = "edge"  # <store>/edge/<collection>/ is the shard; <store>/edge/<collection>.lock its owner
MIGRATED_FOLDER = "migrated-from-local-mode"  # where a migrated local-mode collection's old files are kept
_NAMESPACE = uuid.UUID("6a1f2e0c-5b7d-4c1e-9a8f-3d2b1c0e9f7a")
_COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_POLL = 0.05  # seconds between two tries of a lock someone else holds


def point_id(path: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, path))


def is_url(location: str | os.PathLike) -> bool:
    return str(location).startswith(("http://", "https://"))


@dataclass
class PhotoRecord:
    """What the store knows of one photo file (its payload), and its vectors when they were asked for.
    `error`: the service refused the file (its message); such a record has no vectors."""

    path: str  # absolute
    size: int
    mtime_ns: int
    sha256: str
    taken_at: str | None = None  # EXIF DateTimeOriginal, ISO 8601 without a zone (cameras write local time)
    caption: str | None = None
    error: str | None = None
    vectors: dict[str, list[float]] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        payload = {
            "path": self.path,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "sha256": self.sha256,
            "taken_at": self.taken_at,
            "caption": self.caption,
        }
        if self.error is not None:
            payload["error"] = self.error
        return payload

    @classmethod
    def from_point(cls, payload: dict[str, Any], vector: Any = None) -> PhotoRecord:
        vectors = {name: list(values) for name, values in vector.items()} if isinstance(vector, dict) else {}
        return cls(
            path=payload["path"],
            size=int(payload["size"]),
            mtime_ns=int(payload["mtime_ns"]),
            sha256=payload["sha256"],
            taken_at=payload.get("taken_at"),
            caption=payload.get("caption"),
            error=payload.get("error"),
            vectors=vectors,
        )


@dataclass(frozen=True)
class StoreHit:
    record: PhotoRecord
    score: float

    @property
    def point_id(self) -> str:
        return point_id(self.record.path)


@dataclass
class QueryResult:
    """One search: `fused` is what the engine ranked (reciprocal-rank fusion when both lists were asked
    for); `image` and `caption` are the lists behind it, with each photo's cosine in that list."""

    fused: list[StoreHit]
    image: list[StoreHit] = field(default_factory=list)
    caption: list[StoreHit] = field(default_factory=list)


class StoreError(Exception):
    """The store cannot be opened or used as asked: the message says why and what to do."""

    exit_code = 3


class StoreBusy(StoreError):
    """Another process has the store open and did not hand it over in time: try again later."""

    exit_code = 75  # EX_TEMPFAIL


def date_bound(value: str | dt.date | dt.datetime | None) -> str | None:
    """A capture-date bound as the payload stores dates (ISO 8601, no zone): "2019", "2019-07", "2019-07-14"
    and full timestamps are accepted."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None).isoformat()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day).isoformat()
    text = str(value).strip()
    padded = {4: f"{text}-01-01", 7: f"{text}-01"}.get(len(text), text)
    try:
        return dt.datetime.fromisoformat(padded).replace(tzinfo=None).isoformat()
    except ValueError:
        raise ValueError(f"not a date: {value!r} (write 2019, 2019-07, 2019-07-14 or 2019-07-14T18:30)") from None


class PhotoStore:
    """One collection of photos: `PhotoStore(folder)` is an embedded Qdrant Edge store (":memory:" a
    temporary one), `PhotoStore("http://...")` a Qdrant server's collection."""

    location: str
    collection: str

    def __new__(cls, location: str | os.PathLike = DEFAULT_STORE, *args: Any, **kwargs: Any) -> PhotoStore:
        if cls is PhotoStore:
            cls = ServerStore if is_url(location) else EdgeStore
        return super().__new__(cls)

    def __enter__(self) -> PhotoStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    # -- shape ---------------------------------------------------------------------------------------
    def vector_sizes(self) -> dict[str, int]:
        """The named vectors the collection has, and their sizes ({} before the first photo)."""
        raise NotImplementedError

    def ensure(self, image_size: int, caption_size: int | None) -> bool:
        """Create the collection for these vector sizes, or check that the existing one has them; True when
        it takes caption vectors."""
        raise NotImplementedError

    def check_query(self, vector: Sequence[float], using: str) -> None:
        """A clear error for a query the store cannot answer (a vector of another model's size)."""
        sizes = self.vector_sizes()
        if using in sizes and len(vector) != sizes[using]:
            raise StoreError(
                f"the {using} vectors in {self.location} have {sizes[using]} dimensions, but the query has "
                f"{len(vector)}: search with the service that indexed them, or index into another --store"
            )

    # -- reading -------------------------------------------------------------------------------------
    def records(self, with_vectors: bool = False, include_failed: bool = False) -> Iterator[PhotoRecord]:
        raise NotImplementedError

    def get(self, path: str, with_vectors: bool = True) -> PhotoRecord | None:
        raise NotImplementedError

    def find_by_hash(self, sha256: str) -> PhotoRecord | None:
        """A photo with this content, with its vectors (a copy elsewhere in the library need not be
        embedded), or the record of its refusal."""
        raise NotImplementedError

    def copies(self, hashes: Iterable[str]) -> dict[str, list[str]]:
        """The paths of every indexed photo with each of these contents (through the hash's payload index)."""
        raise NotImplementedError

    def count(self, with_caption: bool = False) -> int:
        raise NotImplementedError

    def search(
        self, vector: Sequence[float], using: str, limit: int, after: str | None = None, before: str | None = None
    ) -> list[StoreHit]:
        """The `limit` nearest photos by one vector, taken from `after` (inclusive) to `before` (exclusive)."""
        return self.query(**{using: vector}, limit=limit, pool=limit, after=after, before=before).fused

    def query(
        self,
        image: Sequence[float] | None = None,
        caption: Sequence[float] | None = None,
        *,
        limit: int,
        pool: int,
        after: str | None = None,
        before: str | None = None,
    ) -> QueryResult:
        """Nearest photos by the image vector, the caption vector, or both fused by the engine's RRF (`pool`
        candidates from each list, `limit` fused results)."""
        raise NotImplementedError

    # -- writing -------------------------------------------------------------------------------------
    def upsert(self, records: Iterable[PhotoRecord]) -> None:
        """Write photos (payload and whichever vectors they carry); a point with the same path is replaced."""
        raise NotImplementedError

    def set_payload(self, record: PhotoRecord) -> None:
        """Update what is known of a file whose content has not changed (a touched file), keeping its vectors."""
        raise NotImplementedError

    def delete(self, paths: Iterable[str]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make every write so far durable."""

    def optimize(self) -> None:
        """Build the search index over what was written (a server does it by itself)."""

    def hand_over(self) -> bool:
        """Between two batches: let a search that waits for the store in (True when one did)."""
        return False


def _named(image: Sequence[float] | None, caption: Sequence[float] | None) -> dict[str, list[float]]:
    return {
        name: list(vector) for name, vector in ((IMAGE_VECTOR, image), (CAPTION_VECTOR, caption)) if vector is not None
    }


# -- Qdrant Edge ---------------------------------------------------------------------------------------


def _edge() -> Any:
    try:
        import qdrant_edge
    except ImportError:
        raise StoreError("the photo index needs qdrant-edge-py: pip install 'embed-services[photos]'") from None
    return qdrant_edge


def _edge_config(qe: Any, sizes: dict[str, int]) -> Any:
    """Vectors on disk (read only to rescore the best candidates), their int8 quantization searched through
    the HNSW graph (4x smaller, and the graph builds ~3x faster on it): the picture's kept in memory, the
    captions' (4096-d for a third of the photos, stored for every point) read from disk. BENCHMARKS.md."""

    def int8(memory: Any) -> Any:
        return qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, memory=memory)

    vectors = {
        name: qe.EdgeVectorParams(
            size=size,
            distance=qe.Distance.Cosine,
            memory=qe.Memory.Cold,
            quantization_config=int8(qe.Memory.Pinned if name == IMAGE_VECTOR else qe.Memory.Cold),
        )
        for name, size in sizes.items()
    }
    return qe.EdgeConfig(
        vectors=vectors,
        quantization_config=int8(qe.Memory.Cold),  # for a caption vector added later
        # ef_construct 64, not Qdrant's 100: a quarter less build time at 100,000 photos, recall@20 still >= 0.99
        hnsw_config=qe.HnswIndexConfig(m=16, ef_construct=64, full_scan_threshold=10_000),
        payload_memory=qe.Memory.Cold,
    )


class _Owner:
    """Who has a store folder open: an exclusive flock on `<collection>.lock`, whose content (JSON) says
    who for the others' messages. A process that waits for it holds `<collection>.queue` shared meanwhile,
    which tells an indexing run to hand the store over after its current batch."""

    def __init__(self, base: Path, role: str, wait: float, notify: Callable[[str], None] | None) -> None:
        self.role, self.wait, self.notify = role, wait, notify
        self.path, self.queue_path = base.with_name(base.name + ".lock"), base.with_name(base.name + ".queue")
        self.since = dt.datetime.now().isoformat(timespec="seconds")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._queue = os.open(self.queue_path, os.O_RDWR | os.O_CREAT, 0o644)
        self.handed_over = 0
        try:
            self._acquire()
        except BaseException:
            os.close(self._fd)
            os.close(self._queue)
            raise

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):  # being rewritten this instant
            return {}

    def describe_holder(self) -> str:
        holder = self.holder()
        what = {"index": "indexing", "search": "searching", "copy": "copying"}.get(holder.get("role", ""), "using it")
        text = f"process {holder.get('pid', '?')} ({what} since {holder.get('since', '?')}"
        if holder.get("state"):
            text += f"; {holder['state']}"
        return text + ")"

    def _try(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.set_state(None)
        return True

    def _acquire(self) -> None:
        if self._try():
            return
        if self.role == "index" and self.holder().get("role") == "index":
            raise StoreBusy(
                f"{self.path.parent.parent} is being indexed by {self.describe_holder()}: one indexing run at a "
                "time; wait for it to finish (searching works meanwhile)"
            )
        fcntl.flock(self._queue, fcntl.LOCK_SH)  # queued: an indexing run lets us in after its batch
        try:
            if self.notify is not None:
                self.notify(f"the store is open in {self.describe_holder()}: waiting up to {self.wait:.0f} s for it")
            deadline = time.monotonic() + self.wait
            while not self._try():
                if time.monotonic() > deadline:
                    raise StoreBusy(
                        f"{self.path.parent.parent} is still in use by {self.describe_holder()} after {self.wait:.0f}"
                        " s: try again later (or give --wait more seconds)"
                    )
                time.sleep(_POLL)
        finally:
            fcntl.flock(self._queue, fcntl.LOCK_UN)

    def set_state(self, state: str | None) -> None:
        info = {"pid": os.getpid(), "role": self.role, "since": self.since, "state": state}
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def someone_waits(self) -> bool:
        try:
            fcntl.flock(self._queue, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._queue, fcntl.LOCK_UN)
        return False

    def let_them_in(self) -> None:
        """Release the store until every process waiting now has had it (each holds the queue until it has the
        store), then take it back once they are done."""
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        fcntl.flock(self._queue, fcntl.LOCK_EX)
        fcntl.flock(self._queue, fcntl.LOCK_UN)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.set_state(None)
        self.handed_over += 1

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the descriptor releases the flock
        os.close(self._queue)


class EdgeStore(PhotoStore):
    """A store folder, opened by this process alone (see the module's docstring). `create`: make the folder
    and the collection if they do not exist (indexing) rather than refuse (searching). `role` names what
    this process does, for the messages of those that wait; `wait` is how long to wait for the store, and
    `notify` is told when waiting starts (and when an old local-mode index is being migrated)."""

    def __init__(
        self,
        location: str | os.PathLike = DEFAULT_STORE,
        collection: str = DEFAULT_COLLECTION,
        *,
        create: bool = True,
        role: str = "open",
        wait: float = DEFAULT_WAIT,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self._qe = _edge()
        if not _COLLECTION_NAME.match(collection):
            raise StoreError(f"{collection!r} is not a collection name (letters, digits, _ . -)")
        self.location, self.collection, self._temporary = str(location), collection, None
        if self.location == ":memory:":
            self._temporary = tempfile.mkdtemp(prefix="embed-photos-")
            root = Path(self._temporary)
        else:
            root = Path(self.location).expanduser().absolute()
        self.root, self.shard_path = root, root / EDGE_FOLDER / collection
        self._shard: Any = None
        _check_folder(root, collection, create)
        (root / EDGE_FOLDER).mkdir(exist_ok=True)
        self._owner = _Owner(self.shard_path, role, wait, notify)
        try:
            migrate_local_mode(self, notify)
            if (self.shard_path / "edge_config.json").is_file():
                self._shard = self._load()
            elif not create:
                raise StoreError(
                    f"{root} holds no collection {collection!r}"
                    + (f" (it holds: {', '.join(self.collections())})" if self.collections() else "")
                    + ": index a folder into it first"
                )
        except BaseException:
            self._owner.release()
            raise

    def collections(self) -> list[str]:
        return sorted(path.name for path in (self.root / EDGE_FOLDER).iterdir() if (path / "edge_config.json").exists())

    def _load(self) -> Any:
        try:
            return self._qe.EdgeShard.load(str(self.shard_path))
        except Exception as exc:  # the engine raises plain Exceptions with its own message
            if "WouldBlock" in str(exc):
                raise StoreBusy(f"{self.shard_path} is open in another program: close it and try again") from exc
            raise StoreError(f"{self.shard_path} could not be opened as a Qdrant Edge store: {exc}") from exc

    @property
    def handed_over(self) -> int:
        """How many times this process let waiting searches in."""
        return self._owner.handed_over

    def close(self) -> None:
        if self._shard is not None:
            self._shard.flush()
            self._shard.close()
            self._shard = None
        if self._owner is not None:
            self._owner.release()
            self._owner = None  # type: ignore[assignment]
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None

    # -- shape ---------------------------------------------------------------------------------------
    def vector_sizes(self) -> dict[str, int]:
        config = self.shard_path / "edge_config.json"
        if self._shard is None or not config.is_file():
            return {}
        vectors = json.loads(config.read_text()).get("vectors", {})
        return {name: int(params["size"]) for name, params in vectors.items()}

    def ensure(self, image_size: int, caption_size: int | None) -> bool:
        qe = self._qe
        wanted = {IMAGE_VECTOR: image_size, CAPTION_VECTOR: caption_size}
        if self._shard is None:
            sizes = {name: size for name, size in wanted.items() if size is not None}
            try:
                self._shard = qe.EdgeShard.create(str(self.shard_path), _edge_config(qe, sizes))
            except Exception as exc:
                raise StoreError(f"could not create a store in {self.shard_path}: {exc}") from exc
            # Payload indexes: date filters and finding a photo's copies never scan the payloads.
            self._shard.update(qe.UpdateOperation.create_field_index("taken_at", qe.PayloadSchemaType.Datetime))
            self._shard.update(qe.UpdateOperation.create_field_index("sha256", qe.PayloadSchemaType.Keyword))
            return caption_size is not None
        have = self.vector_sizes()
        for name, size in wanted.items():
            if size is not None and have.get(name) not in (None, size):
                raise StoreError(
                    f"the store {self.location} (collection {self.collection!r}) holds {name} vectors of size "
                    f"{have[name]}, but the service gives {size}: index into another --store or --collection"
                )
        if caption_size is not None and CAPTION_VECTOR not in have:  # unlike a server collection, a shard can add one
            self._shard.update(qe.UpdateOperation.create_dense_vector(CAPTION_VECTOR, caption_size, qe.Distance.Cosine))
        return caption_size is not None

    # -- reading -------------------------------------------------------------------------------------
    def _has(self, name: str) -> Any:
        return self._qe.HasVectorCondition(name)

    def records(self, with_vectors: bool = False, include_failed: bool = False) -> Iterator[PhotoRecord]:
        qe = self._qe
        if self._shard is None:
            return
        only = None if include_failed else qe.Filter(must=[self._has(IMAGE_VECTOR)])
        offset = None
        while True:
            request = qe.ScrollRequest(
                offset=offset, limit=512, filter=only, with_payload=True, with_vector=with_vectors
            )
            points, offset = self._shard.scroll(request)
            for point in points:
                yield PhotoRecord.from_point(point.payload or {}, point.vector)
            if offset is None:
                return

    def get(self, path: str, with_vectors: bool = True) -> PhotoRecord | None:
        if self._shard is None:
            return None
        found = self._shard.retrieve([point_id(path)], with_payload=True, with_vector=with_vectors)
        return PhotoRecord.from_point(found[0].payload or {}, found[0].vector) if found else None

    def find_by_hash(self, sha256: str) -> PhotoRecord | None:
        qe = self._qe
        if self._shard is None:
            return None
        same = qe.Filter(must=[qe.FieldCondition(key="sha256", match=qe.MatchValue(sha256))])
        points, _ = self._shard.scroll(qe.ScrollRequest(limit=1, filter=same, with_payload=True, with_vector=True))
        return PhotoRecord.from_point(points[0].payload or {}, points[0].vector) if points else None

    def copies(self, hashes: Iterable[str]) -> dict[str, list[str]]:
        qe = self._qe
        wanted = sorted(set(hashes))
        found: dict[str, list[str]] = {}
        if self._shard is None or not wanted:
            return found
        among = qe.Filter(must=[qe.FieldCondition(key="sha256", match=qe.MatchAny(wanted)), self._has(IMAGE_VECTOR)])
        offset = None
        while True:
            request = qe.ScrollRequest(offset=offset, limit=512, filter=among, with_payload=True, with_vector=False)
            points, offset = self._shard.scroll(request)
            for point in points:
                found.setdefault(point.payload["sha256"], []).append(point.payload["path"])
            if offset is None:
                return {sha256: sorted(paths) for sha256, paths in found.items()}

    def count(self, with_caption: bool = False) -> int:
        qe = self._qe
        if self._shard is None:
            return 0
        having = qe.Filter(must=[self._has(CAPTION_VECTOR if with_caption else IMAGE_VECTOR)])
        if with_caption and CAPTION_VECTOR not in self.vector_sizes():
            return 0
        return self._shard.count(qe.CountRequest(exact=True, filter=having))

    def _dates(self, after: str | None, before: str | None) -> Any:
        qe = self._qe
        if after is None and before is None:
            return None
        taken = qe.RangeDateTime(gte=after, lt=before)
        return qe.Filter(must=[qe.FieldCondition(key="taken_at", range=taken)])

    def _hits(self, points: list[Any]) -> list[StoreHit]:
        return [StoreHit(PhotoRecord.from_point(point.payload or {}), float(point.score)) for point in points]

    def query(
        self,
        image: Sequence[float] | None = None,
        caption: Sequence[float] | None = None,
        *,
        limit: int,
        pool: int,
        after: str | None = None,
        before: str | None = None,
    ) -> QueryResult:
        qe = self._qe
        if self._shard is None:
            return QueryResult([])
        dates = self._dates(after, before)
        rescored = qe.QuantizationSearchParams(rescore=True, oversampling=OVERSAMPLING)
        params = qe.SearchParams(hnsw_ef=max(HNSW_EF, pool), quantization=rescored)
        lists = {
            name: list(vector)
            for name, vector in ((IMAGE_VECTOR, image), (CAPTION_VECTOR, caption))
            if vector is not None
        }
        for name, vector in lists.items():
            self.check_query(vector, name)
        singles = [
            qe.QueryRequest(
                limit=pool, query=qe.Query.Nearest(vector, using=name), filter=dates, params=params, with_payload=True
            )
            for name, vector in lists.items()
        ]
        requests = list(singles)
        if len(lists) > 1:  # the engine fuses the two lists itself (the same prefetches as the single lists)
            prefetches = [
                qe.Prefetch(limit=pool, query=qe.Query.Nearest(vector, using=name), filter=dates, params=params)
                for name, vector in lists.items()
            ]
            requests.append(
                qe.QueryRequest(
                    limit=limit, prefetches=prefetches, query=qe.Fusion.Rrf(k=ENGINE_RRF_K), with_payload=True
                )
            )
        answers = [self._hits(points) for points in self._shard.query_batch(qe.QueryBatchRequest(requests))]
        by_name = dict(zip(lists, answers, strict=False))
        fused = answers[-1] if len(lists) > 1 else answers[0][:limit]
        return QueryResult(fused, by_name.get(IMAGE_VECTOR, []), by_name.get(CAPTION_VECTOR, []))

    # -- writing -------------------------------------------------------------------------------------
    def upsert(self, records: Iterable[PhotoRecord]) -> None:
        qe = self._qe
        points = [qe.Point(point_id(r.path), dict(r.vectors), r.payload()) for r in records]
        if points:
            self._shard.update(qe.UpdateOperation.upsert_points(points))

    def set_payload(self, record: PhotoRecord) -> None:
        qe = self._qe
        self._shard.update(qe.UpdateOperation.overwrite_payload([point_id(record.path)], record.payload()))

    def delete(self, paths: Iterable[str]) -> None:
        ids = [point_id(path) for path in paths]
        if ids and self._shard is not None:
            self._shard.update(self._qe.UpdateOperation.delete_points(ids))

    def flush(self) -> None:
        if self._shard is not None:
            self._shard.flush()

    def optimize(self) -> None:
        """Build the HNSW graph and the quantized vectors of what is new (Qdrant Edge does not do it in the
        background); searches wait meanwhile, and the lock file says so."""
        if self._shard is None:
            return
        self._owner.set_state(f"building the search index since {dt.datetime.now():%H:%M:%S}")
        try:
            self._shard.optimize()
            self._shard.flush()
        finally:
            self._owner.set_state(None)

    def hand_over(self) -> bool:
        if self._owner is None or not self._owner.someone_waits():
            return False
        if self._shard is not None:
            self._shard.flush()
            self._shard.close()
            self._shard = None
        self._owner.let_them_in()
        if (self.shard_path / "edge_config.json").is_file():
            self._shard = self._load()
        return True


def _check_folder(root: Path, collection: str, create: bool) -> None:
    """Refuse a path that is not a store folder (a file, someone's other folder) with the reason."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a store folder: give --store a folder (or a Qdrant server's URL)")
    if not root.exists():
        if not create:
            raise StoreError(f"there is no photo index at {root}: index a folder first (python -m embed_client index)")
        root.mkdir(parents=True)
        return
    entries = [name for name in os.listdir(root) if not name.startswith(".")]
    if entries and EDGE_FOLDER not in entries and "meta.json" not in entries:
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise StoreError(
            f"{root} is not a photo index (it holds {shown}): give --store a new or empty folder, or the folder "
            "an earlier `index` wrote"
        )


# -- the index before Qdrant Edge: qdrant-client's local mode, migrated in place --------------------------


def local_mode_collections(root: Path) -> dict[str, Any]:
    """The collections of a qdrant-client local-mode folder (meta.json), by name."""
    try:
        return json.loads((root / "meta.json").read_text()).get("collections", {})
    except (OSError, ValueError):
        return {}


def _local_mode_points(sqlite_path: Path) -> Iterator[Any]:
    """The points of a local-mode collection, read the way qdrant-client reads them (one pickled PointStruct
    per row; the newest row of an id wins), streamed rather than all in memory."""
    try:
        import qdrant_client.http.models  # noqa: F401  (unpickling needs its classes)
    except ImportError:
        raise StoreError(
            "this store was written by qdrant-client's local mode; migrating it needs qdrant-client: "
            "pip install 'embed-services[photos]'"
        ) from None
    connection = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    try:
        seen: set[str] = set()
        for _, value in connection.execute("SELECT rowid, point FROM points ORDER BY rowid DESC"):
            point = pickle.loads(value)  # the user's own store, as qdrant-client itself reads it
            key = str(point.id)
            if key not in seen:
                seen.add(key)
                yield point
    finally:
        connection.close()


def migrate_local_mode(store: EdgeStore, notify: Callable[[str], None] | None) -> int:
    """Move a collection that qdrant-client's local mode wrote in this folder into Qdrant Edge: its points are
    copied (ids, vectors, payload: nothing is embedded again), then the old files are moved to
    `migrated-from-local-mode/`. Safe to interrupt: the new shard is renamed into place only when complete."""
    root, name = store.root, store.collection
    config = local_mode_collections(root).get(name)
    if config is None:
        return 0
    old = root / "collection" / name
    count = 0
    if not (store.shard_path / "edge_config.json").is_file():
        lock = _local_mode_lock(root)
        try:
            count = _copy_local_mode(store, config, old, notify)
        finally:
            os.close(lock)
    _set_aside(root, name, old)
    return count


def _local_mode_lock(root: Path) -> int:
    """qdrant-client's own lock on its folder: an older program still using it must not be migrated under."""
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreBusy(f"{root} is open in a program using qdrant-client's local mode: close it first") from None
    return fd


def _copy_local_mode(store: EdgeStore, config: dict[str, Any], old: Path, notify: Callable[[str], None] | None) -> int:
    qe, started = store._qe, time.monotonic()
    vectors = (config.get("vectors") or {}) if isinstance(config.get("vectors"), dict) else {}
    sizes = {vector: int(params["size"]) for vector, params in vectors.items() if "size" in params}
    if IMAGE_VECTOR not in sizes or not (old / "storage.sqlite").is_file():
        raise StoreError(
            f"{store.root} holds a qdrant-client collection {store.collection!r} that is not a photo index this "
            f"version can migrate (vectors {sorted(sizes)}, no {old / 'storage.sqlite'}): index into another --store"
        )
    if notify is not None:
        notify(
            f"{store.root} was written by qdrant-client's local mode: migrating it to Qdrant Edge (once; nothing is "
            "embedded again)"
        )
    building = store.shard_path.with_name(store.collection + ".migrating")
    shutil.rmtree(building, ignore_errors=True)  # what an interrupted migration left
    shard = qe.EdgeShard.create(str(building), _edge_config(qe, sizes))
    count = 0
    try:
        shard.update(qe.UpdateOperation.create_field_index("taken_at", qe.PayloadSchemaType.Datetime))
        shard.update(qe.UpdateOperation.create_field_index("sha256", qe.PayloadSchemaType.Keyword))
        batch: list[Any] = []
        for point in _local_mode_points(old / "storage.sqlite"):
            vector = point.vector if isinstance(point.vector, dict) else {}
            batch.append(qe.Point(str(point.id), {k: list(v) for k, v in vector.items()}, dict(point.payload or {})))
            if len(batch) == 256:
                shard.update(qe.UpdateOperation.upsert_points(batch))
                count, batch = count + len(batch), []
        if batch:
            shard.update(qe.UpdateOperation.upsert_points(batch))
            count += len(batch)
        shard.optimize()
        shard.flush()
    finally:
        shard.close()
    os.replace(building, store.shard_path)
    if notify is not None:
        notify(f"migrated {count} photos in {time.monotonic() - started:.1f} s")
    return count


def _set_aside(root: Path, name: str, old: Path) -> None:
    """The migrated collection's old files go to migrated-from-local-mode/ (delete it when sure); meta.json
    keeps the collections not migrated yet, or goes there too when none is left."""
    kept = root / MIGRATED_FOLDER
    kept.mkdir(exist_ok=True)
    if old.exists():
        os.replace(old, kept / name)
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.get("collections", {}).pop(name, None)
    if meta.get("collections"):
        temporary = meta_path.with_name("meta.json.tmp")
        temporary.write_text(json.dumps(meta))
        os.replace(temporary, meta_path)
    else:
        os.replace(meta_path, kept / "meta.json")
        with contextlib.suppress(OSError):
            (root / "collection").rmdir()


# -- a Qdrant server ----------------------------------------------------------------------------------------


class ServerStore(PhotoStore):
    """A collection on a Qdrant server (or cluster), through qdrant-client; `client` is for a client made
    elsewhere (the tests give one of qdrant-client's local mode, which speaks the server's API)."""

    def __init__(
        self,
        location: str | os.PathLike = DEFAULT_STORE,
        collection: str = DEFAULT_COLLECTION,
        *,
        client: Any = None,
        **_: Any,
    ) -> None:
        try:
            from qdrant_client import QdrantClient
        except ImportError:
            raise StoreError("a Qdrant server needs qdrant-client: pip install 'embed-services[photos]'") from None
        self.location, self.collection = str(location), collection
        self._client = client or QdrantClient(url=self.location, api_key=os.environ.get("QDRANT_API_KEY") or None)
        try:
            self._exists = self._client.collection_exists(collection)
        except Exception as exc:  # httpx / grpc errors of a server that does not answer
            raise StoreError(f"the Qdrant store at {self.location} does not answer: {exc}") from exc

    def close(self) -> None:
        self._client.close()

    def vector_sizes(self) -> dict[str, int]:
        if not self._exists:
            return {}
        vectors = self._client.get_collection(self.collection).config.params.vectors
        return {name: params.size for name, params in (vectors or {}).items()}  # type: ignore[union-attr]

    def ensure(self, image_size: int, caption_size: int | None) -> bool:
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
        self._client.create_payload_index(self.collection, "sha256", models.PayloadSchemaType.KEYWORD)
        self._client.create_payload_index(self.collection, "taken_at", models.PayloadSchemaType.DATETIME)
        self._exists = True
        return caption_size is not None

    def _scroll(self, query: Any, with_vectors: bool, limit: int = 512) -> Iterator[Any]:
        offset = None
        while True:
            points, offset = self._client.scroll(
                self.collection,
                scroll_filter=query,
                limit=limit,
                offset=offset,
                with_payload=True,
                with_vectors=with_vectors,
            )
            yield from points
            if offset is None:
                return

    def records(self, with_vectors: bool = False, include_failed: bool = False) -> Iterator[PhotoRecord]:
        from qdrant_client import models

        if not self._exists:
            return
        only = None if include_failed else models.Filter(must=[models.HasVectorCondition(has_vector=IMAGE_VECTOR)])
        for point in self._scroll(only, with_vectors):
            yield PhotoRecord.from_point(point.payload or {}, point.vector)

    def get(self, path: str, with_vectors: bool = True) -> PhotoRecord | None:
        if not self._exists:
            return None
        points = self._client.retrieve(self.collection, [point_id(path)], with_payload=True, with_vectors=with_vectors)
        return PhotoRecord.from_point(points[0].payload or {}, points[0].vector) if points else None

    def find_by_hash(self, sha256: str) -> PhotoRecord | None:
        from qdrant_client import models

        if not self._exists:
            return None
        same = models.Filter(must=[models.FieldCondition(key="sha256", match=models.MatchValue(value=sha256))])
        points, _ = self._client.scroll(
            self.collection, scroll_filter=same, limit=1, with_payload=True, with_vectors=True
        )
        return PhotoRecord.from_point(points[0].payload or {}, points[0].vector) if points else None

    def copies(self, hashes: Iterable[str]) -> dict[str, list[str]]:
        from qdrant_client import models

        wanted = sorted(set(hashes))
        if not self._exists or not wanted:
            return {}
        among = models.Filter(
            must=[
                models.FieldCondition(key="sha256", match=models.MatchAny(any=wanted)),
                models.HasVectorCondition(has_vector=IMAGE_VECTOR),
            ]
        )
        found: dict[str, list[str]] = {}
        for point in self._scroll(among, with_vectors=False):
            found.setdefault(point.payload["sha256"], []).append(point.payload["path"])
        return {sha256: sorted(paths) for sha256, paths in found.items()}

    def count(self, with_caption: bool = False) -> int:
        from qdrant_client import models

        name = CAPTION_VECTOR if with_caption else IMAGE_VECTOR
        if not self._exists or name not in self.vector_sizes():
            return 0
        having = models.Filter(must=[models.HasVectorCondition(has_vector=name)])
        return self._client.count(self.collection, count_filter=having, exact=True).count

    def query(
        self,
        image: Sequence[float] | None = None,
        caption: Sequence[float] | None = None,
        *,
        limit: int,
        pool: int,
        after: str | None = None,
        before: str | None = None,
    ) -> QueryResult:
        from qdrant_client import models

        if not self._exists:
            return QueryResult([])
        dates = None
        if after is not None or before is not None:
            taken = models.DatetimeRange(gte=after, lt=before)
            dates = models.Filter(must=[models.FieldCondition(key="taken_at", range=taken)])
        params = models.SearchParams(hnsw_ef=max(HNSW_EF, pool))
        lists = {
            name: list(vector)
            for name, vector in ((IMAGE_VECTOR, image), (CAPTION_VECTOR, caption))
            if vector is not None
        }
        for name, vector in lists.items():
            self.check_query(vector, name)
        requests = [
            models.QueryRequest(query=vector, using=name, limit=pool, filter=dates, params=params, with_payload=True)
            for name, vector in lists.items()
        ]
        if len(lists) > 1:
            prefetch = [
                models.Prefetch(query=vector, using=name, limit=pool, filter=dates, params=params)
                for name, vector in lists.items()
            ]
            fusion = models.RrfQuery(rrf=models.Rrf(k=ENGINE_RRF_K))
            requests.append(models.QueryRequest(prefetch=prefetch, query=fusion, limit=limit, with_payload=True))
        answers = [
            [StoreHit(PhotoRecord.from_point(p.payload or {}), float(p.score)) for p in response.points]
            for response in self._client.query_batch_points(self.collection, requests=requests)
        ]
        by_name = dict(zip(lists, answers, strict=False))
        fused = answers[-1] if len(lists) > 1 else answers[0][:limit]
        return QueryResult(fused, by_name.get(IMAGE_VECTOR, []), by_name.get(CAPTION_VECTOR, []))

    def upsert(self, records: Iterable[PhotoRecord]) -> None:
        from qdrant_client import models

        points = [models.PointStruct(id=point_id(r.path), vector=r.vectors, payload=r.payload()) for r in records]
        if points:
            self._client.upsert(self.collection, points=points, wait=True)

    def set_payload(self, record: PhotoRecord) -> None:
        self._client.overwrite_payload(
            self.collection, payload=record.payload(), points=[point_id(record.path)], wait=True
        )

    def delete(self, paths: Iterable[str]) -> None:
        from qdrant_client import models

        ids = [point_id(path) for path in paths]
        if ids and self._exists:
            self._client.delete(self.collection, points_selector=models.PointIdsList(points=ids), wait=True)


# -- moving an index ----------------------------------------------------------------------------------------


def copy_store(source: PhotoStore, target: PhotoStore, batch: int = 256) -> int:
    """Copy every point (vectors, payload, remembered refusals) from one store to another, e.g. a folder to a
    Qdrant server: the same ids, so copying again overwrites rather than duplicates. Returns the count."""
    sizes = source.vector_sizes()
    if IMAGE_VECTOR not in sizes:
        return 0
    if not target.ensure(sizes[IMAGE_VECTOR], sizes.get(CAPTION_VECTOR)) and CAPTION_VECTOR in sizes:
        raise StoreError(
            f"the collection {target.collection!r} at {target.location} has no caption vectors, but the source "
            "has some: copy into a new collection"
        )
    count, pending = 0, []
    for record in source.records(with_vectors=True, include_failed=True):
        pending.append(record)
        if len(pending) == batch:
            target.upsert(pending)
            count, pending = count + len(pending), []
    target.upsert(pending)
    count += len(pending)
    target.flush()
    target.optimize()
    return count
