"""Index a folder of photos: walk it, embed what is new or changed with the SigLIP2 service, store it.

    from embed_client import index_folder
    report = index_folder("~/Pictures", store="~/.cache/embed-photos/qdrant")
    print(report.summary())

A run is incremental and safe to interrupt: a file whose size and modification time match its point
is skipped unread; a touched file whose content hash still matches keeps its vectors; a file with the
content of another photo (in the store, or earlier in the same run) takes that photo's vectors without
being sent, and is counted as a copy; a file gone from the folder loses its point. Each batch is written
as soon as it is embedded, so a killed run loses at most the batches in flight, and the next run picks
up there. At the end, the store builds its search index over what is new (`PhotoStore.optimize`).

A file the service refuses (broken, unsupported, too large) is recorded with the service's own message
and the run goes on; the store remembers the refusal, so the file is not sent again while its size and
modification time stay the same (`retry_failed` sends it anyway), and every summary still lists it. A
busy service (503/429) halves the number of requests in flight and waits its Retry-After; an
unreachable one (restarting) is waited for, up to `max_wait` seconds at a time.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from .client import BadRequest, EmbedClient, ServiceBusy, ServiceError, Unreachable
from .store import CAPTION_VECTOR, DEFAULT_STORE, IMAGE_VECTOR, PhotoRecord, PhotoStore

DEFAULT_SERVICE = "http://localhost:6010"  # SigLIP2 (embed_core/table.py)
DEFAULT_TEXT_SERVICE = "http://localhost:6014"  # Qwen3-Embedding-8B (embed_core/table.py)
DOOR_SECONDS = 0.1  # how often an indexing run looks for a search waiting for the store between its writes

# File extensions per image format name, for the formats a service's /health lists.
FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif", ".mpo"),
    "PNG": (".png",),
    "WEBP": (".webp",),
    "GIF": (".gif",),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
    "HEIF": (".heic", ".heif", ".hif"),
    "HEIC": (".heic", ".heif", ".hif"),
    "AVIF": (".avif",),
}
# When the service does not list its formats: every format a photo library holds. A file in a format the
# service then refuses is reported with its message, like any other refused file.
FALLBACK_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")

ALL_EXTENSIONS = frozenset(extension for extensions in FORMAT_EXTENSIONS.values() for extension in extensions)

_EXIF_IFD, _DATE_TIME_ORIGINAL, _DATE_TIME, _IMAGE_DESCRIPTION = 0x8769, 0x9003, 0x0132, 0x010E
_XMP_DESCRIPTION = re.compile(rb"<dc:description>.*?<rdf:li[^>]*>(.*?)</rdf:li>", re.DOTALL)
_IMAGES_PARAM = re.compile(r"images\[(\d+)\]")
_FIELD = re.compile(r"`images?(\[\d+\])?`")


@dataclass(frozen=True)
class FileError:
    path: str
    reason: str
    earlier: bool = False  # refused on an earlier run, unchanged since: not sent again


@dataclass
class IndexReport:
    """What one run did. `timings` are seconds summed over the worker threads: `read` (reading, hashing,
    EXIF), `images` and `captions` (HTTP round trips to the services), `store` (writes to the store)."""

    folder: str
    store: str
    found: int = 0
    added: int = 0
    updated: int = 0  # re-embedded: the content changed
    unchanged: int = 0
    touched: int = 0  # new mtime, same content: metadata updated, vectors kept
    copied: int = 0  # same content as another photo in the store: its vectors reused
    removed: int = 0
    captions: int = 0  # caption vectors written
    handed_over: int = 0  # times the run let a waiting search use the store between two batches
    errors: list[FileError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("read", "images", "captions", "store", "optimize"), 0)
    )

    @property
    def embedded(self) -> int:
        return self.added + self.updated

    def summary(self) -> str:
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        earlier = sum(error.earlier for error in self.errors)
        errors = f"{len(self.errors)} errors" + (f" ({earlier} refused on an earlier run)" if earlier else "")
        return (
            f"{self.folder}: {self.found} photos; {self.added} added, {self.updated} re-embedded, "
            f"{self.copied} copies, {self.touched} touched, {self.unchanged} unchanged, {self.removed} removed, "
            f"{self.captions} captions, {errors} in {self.seconds:.1f} s ({rate:.1f} photos/s)"
        )


@dataclass
class _File:
    path: str
    size: int
    mtime_ns: int
    caption: str | None = None  # from the sidecar
    data: bytes = b""
    sha256: str = ""
    taken_at: str | None = None


# -- what to index --------------------------------------------------------------------------------------


def extensions_for(health: Mapping[str, Any]) -> frozenset[str]:
    """The file extensions of the formats the service says it takes (`formats` or `image_formats` in /health)."""
    listed = health.get("formats") or health.get("image_formats") or FALLBACK_FORMATS
    found: set[str] = set()
    for item in listed:
        name = str(item).strip().upper().lstrip(".")
        found.update(FORMAT_EXTENSIONS.get(name, (f".{name.lower()}",)))
    return frozenset(found)


def walk(folder: Path, extensions: frozenset[str]) -> Iterator[Path]:
    """Files under `folder` with one of the extensions, in a stable order; hidden files and folders are
    skipped (thumbnail caches, .trash)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                yield Path(root) / name


def load_captions(sidecar: str | os.PathLike, folder: Path) -> dict[str, str]:
    """A JSON object {path: caption}, a JSON list of {"path", "caption"}, or a CSV with `path` and
    `caption` columns. Relative paths are relative to the photo folder."""
    sidecar = Path(sidecar).expanduser()
    text = sidecar.read_text(encoding="utf-8-sig")
    if sidecar.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows and not {"path", "caption"} <= set(rows[0]):
            raise ValueError(f"{sidecar}: a captions CSV needs a header with `path` and `caption` columns")
        pairs = [(row["path"], row["caption"]) for row in rows]
    else:
        loaded = json.loads(text)
        if isinstance(loaded, dict):
            pairs = list(loaded.items())
        elif isinstance(loaded, list):
            pairs = [(item["path"], item["caption"]) for item in loaded]
        else:
            raise ValueError(f"{sidecar}: expected a JSON object or list of {{path, caption}}")
    return {
        os.path.abspath(folder / Path(path).expanduser()): str(caption).strip()
        for path, caption in pairs
        if caption and str(caption).strip()
    }


def read_metadata(data: bytes) -> tuple[str | None, str | None]:
    """(EXIF capture date as ISO 8601, the photo's own description from EXIF or XMP), None where absent."""
    taken_at = description = None
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            exif = image.getexif()
            raw_date = exif.get_ifd(_EXIF_IFD).get(_DATE_TIME_ORIGINAL) or exif.get(_DATE_TIME)
            if raw_date:
                taken_at = datetime.strptime(str(raw_date).strip("\0 "), "%Y:%m:%d %H:%M:%S").isoformat()
            raw_description = exif.get(_IMAGE_DESCRIPTION)
            if isinstance(raw_description, str) and raw_description.strip("\0 "):
                description = raw_description.strip("\0 ")
    except Exception:  # not an image Pillow reads, or a malformed EXIF block: the service will say which
        pass
    if description is None:
        match = _XMP_DESCRIPTION.search(data)
        if match:
            description = html.unescape(match.group(1).decode("utf-8", errors="replace")).strip() or None
    return taken_at, description


def register_heif() -> None:
    """HEIC/AVIF metadata and thumbnails, where pillow-heif is installed (the service decodes them itself)."""
    try:
        import pillow_heif
    except ImportError:
        return
    pillow_heif.register_heif_opener()


# -- talking to the services ----------------------------------------------------------------------------

T = TypeVar("T")


class _Limiter:
    """At most `limit` requests in flight; a busy answer halves the limit, each success raises it by one
    (up to the concurrency asked for)."""

    def __init__(self, concurrency: int) -> None:
        self.most, self.limit, self.active = concurrency, concurrency, 0
        self._cond = threading.Condition()

    def __enter__(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.active < self.limit)
            self.active += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify_all()

    def busy(self) -> None:
        with self._cond:
            self.limit = max(1, self.limit // 2)

    def ok(self) -> None:
        with self._cond:
            if self.limit < self.most:
                self.limit += 1
                self._cond.notify_all()


def _patiently(call: Callable[[], T], limiter: _Limiter, max_wait: float, what: str) -> T:
    """Call until the service answers: busy -> fewer requests and its Retry-After; unreachable -> wait for it."""
    delay, waited_since = 0.5, None
    while True:
        try:
            with limiter:
                result = call()
            limiter.ok()
            return result
        except ServiceBusy as exc:
            limiter.busy()
            pause = exc.retry_after if exc.retry_after is not None else delay
            failure: Exception = exc
        except Unreachable as exc:
            pause, failure = delay, exc
        now = time.monotonic()
        waited_since = waited_since or now
        if now - waited_since > max_wait:
            raise Unreachable(f"{what}: no answer for {max_wait:.0f} s: {failure}") from failure
        time.sleep(pause)
        delay = min(delay * 2, 10.0)


class _Indexer:
    def __init__(
        self,
        store: PhotoStore,
        images: EmbedClient,
        texts: EmbedClient | None,
        report: IndexReport,
        *,
        concurrency: int,
        max_wait: float,
        retry_failed: bool = False,
    ) -> None:
        self.store, self.images, self.texts, self.report = store, images, texts, report
        self.limiter = _Limiter(concurrency)
        self.max_wait, self.retry_failed = max_wait, retry_failed
        self.lock = threading.Lock()  # the store and the report are touched by one worker at a time
        # Contents being embedded by a batch in flight: a copy in another batch waits for it rather than
        # being sent too (the claiming batch writes its points before it sets the event, never waits first).
        self.claims: dict[str, threading.Event] = {}

    def timed(self, key: str, started: float) -> None:
        with self.lock:
            self.report.timings[key] += time.perf_counter() - started

    def hand_over(self) -> None:
        """Let a search that waits for the store in, when no worker is using the store; caller holds the lock."""
        if self.store.hand_over():
            self.report.handed_over += 1

    def doorman(self, stop: threading.Event) -> None:
        """While the workers wait for the service, a search that queued for the store is let in within
        DOOR_SECONDS, not only after the next batch is written (a batch can take seconds to embed)."""
        while not stop.wait(DOOR_SECONDS):
            with self.lock:
                self.hand_over()

    def count(self, counts: dict[str, int], kind: str) -> None:
        counts[kind] = counts.get(kind, 0) + 1

    def source(self, sha256: str) -> PhotoRecord | None:
        """A stored point with this content (its vectors, or the service's refusal of it); caller holds the lock."""
        found = self.store.find_by_hash(sha256)
        if found is not None and found.error is not None and self.retry_failed:
            return None
        return found

    def reuse(self, record: PhotoRecord, source: PhotoRecord) -> bool:
        """Take what is known of the same content: its vectors (True), or its refusal (False)."""
        if source.error is not None or IMAGE_VECTOR not in source.vectors:
            record.error = source.error or "refused by the service"
            if source.path != record.path:
                record.error = f"same content as {source.path}, which was refused: {source.error}"
            return False
        record.vectors[IMAGE_VECTOR] = source.vectors[IMAGE_VECTOR]
        if source.caption == record.caption and CAPTION_VECTOR in source.vectors:
            record.vectors[CAPTION_VECTOR] = source.vectors[CAPTION_VECTOR]
        return True

    def run_batch(self, batch: list[_File], known: Mapping[str, PhotoRecord]) -> int:
        """Read, embed and store one batch; returns how many files it settled (all of them)."""
        started = time.perf_counter()
        unreadable: dict[str, str] = {}
        for item in batch:
            try:
                item.data = Path(item.path).read_bytes()
            except OSError as exc:  # removed or locked since the walk
                unreadable[item.path] = f"could not be read: {exc.strerror or exc}"
                continue
            item.sha256 = hashlib.sha256(item.data).hexdigest()
            item.taken_at, description = read_metadata(item.data)
            item.caption = item.caption or description
        self.timed("read", started)
        count = len(batch)
        batch = [item for item in batch if item.path not in unreadable]

        records: dict[str, PhotoRecord] = {}
        to_embed: dict[str, str] = {}  # path -> "added" or "updated"
        waiting: dict[str, threading.Event] = {}  # path -> the claim of the batch that embeds its content
        mine: list[str] = []  # contents this batch claimed
        counts: dict[str, int] = {}
        with self.lock:
            for item in batch:
                record = PhotoRecord(item.path, item.size, item.mtime_ns, item.sha256, item.taken_at, item.caption)
                records[item.path] = record
                before = known.get(item.path)
                if before is not None and before.sha256 == item.sha256 and before.error is None:
                    source, kind = self.store.get(item.path), "touched"
                elif item.sha256 in self.claims:
                    waiting[item.path] = self.claims[item.sha256]
                    continue
                else:
                    source, kind = self.source(item.sha256), "copied"
                if source is not None and source.error is None and IMAGE_VECTOR not in source.vectors:
                    source = None  # a point without its picture's vector: embed the file
                if source is None:
                    to_embed[item.path] = "updated" if before is not None else "added"
                    self.claims[item.sha256] = threading.Event()
                    mine.append(item.sha256)
                elif self.reuse(record, source):
                    self.count(counts, kind)
        try:
            self.embed_and_store(batch, records, to_embed, unreadable, counts, known)
        finally:
            with self.lock:
                for sha256 in mine:
                    self.claims.pop(sha256).set()
        if waiting:
            self.store_copies(records, waiting, known)
        for item in batch:
            item.data = b""
        return count

    def embed_and_store(
        self,
        batch: list[_File],
        records: dict[str, PhotoRecord],
        to_embed: dict[str, str],
        unreadable: dict[str, str],
        counts: dict[str, int],
        known: Mapping[str, PhotoRecord],
    ) -> None:
        vectors, refused = self.embed_images([item for item in batch if item.path in to_embed])
        for path, reason in refused.items():
            records[path].error = reason
        for path, vector in vectors.items():
            records[path].vectors[IMAGE_VECTOR] = vector
            self.count(counts, to_embed[path])
        done = [record for record in records.values() if record.vectors or record.error is not None]
        self.embed_captions([record for record in done if record.error is None])
        self.write(done, counts, unreadable, known)

    def store_copies(
        self, records: dict[str, PhotoRecord], waiting: dict[str, threading.Event], known: Mapping[str, PhotoRecord]
    ) -> None:
        """Files whose content another batch was embedding: its point is stored now (or its refusal)."""
        for event in set(waiting.values()):
            event.wait()
        counts: dict[str, int] = {}
        with self.lock:
            leftover = []
            for path in waiting:
                record, source = records[path], self.source(records[path].sha256)
                if source is None:  # that batch failed as a whole (the run is ending): send this one
                    leftover.append(path)
                elif self.reuse(record, source):
                    self.count(counts, "copied")
        if leftover:
            files = [_File(path, records[path].size, records[path].mtime_ns) for path in leftover]
            for item in files:
                item.data = Path(item.path).read_bytes()
            self.embed_and_store(
                files, {p: records[p] for p in leftover}, dict.fromkeys(leftover, "added"), {}, counts, known
            )
        self.write([records[path] for path in waiting if path not in leftover], counts, {}, known)

    def write(
        self,
        done: list[PhotoRecord],
        counts: dict[str, int],
        unreadable: dict[str, str],
        known: Mapping[str, PhotoRecord],
    ) -> None:
        started = time.perf_counter()
        with self.lock:
            # A refused file is stored as a point without vectors that says why: a file that no longer embeds
            # loses the vectors of its old content, and it is not sent again while unchanged.
            self.store.upsert(done)
            self.store.delete(path for path in unreadable if path in known)
            self.report.errors.extend(FileError(path, reason) for path, reason in unreadable.items())
            self.report.errors.extend(FileError(r.path, r.error) for r in done if r.error is not None)
            for kind, count in counts.items():
                setattr(self.report, kind, getattr(self.report, kind) + count)
            counts.clear()
            self.hand_over()
        self.timed("store", started)

    def embed_images(self, files: list[_File]) -> tuple[dict[str, list[float]], dict[str, str]]:
        """Vectors by path, and the reason for each file the service refused (the others still embedded)."""
        vectors: dict[str, list[float]] = {}
        errors: dict[str, str] = {}
        pending = list(files)
        while pending:
            started = time.perf_counter()
            try:
                batch = [item.data for item in pending]
                found = _patiently(lambda b=batch: self.images.embed_images(b), self.limiter, self.max_wait, "images")
            except (BadRequest, ServiceError) as exc:
                if isinstance(exc, ServiceBusy):
                    raise
                match = _IMAGES_PARAM.search(exc.param or "") or _IMAGES_PARAM.search(exc.message)
                if len(pending) == 1:
                    errors[pending.pop().path] = _reason(exc)
                elif match and int(match.group(1)) < len(pending):
                    culprit = pending.pop(int(match.group(1)))
                    errors[culprit.path] = _reason(exc)
                else:  # the request as a whole was refused: find out file by file
                    for item in pending:
                        single, refused = self.embed_images([item])
                        vectors.update(single)
                        errors.update(refused)
                    pending = []
                continue
            finally:
                self.timed("images", started)
            vectors.update((item.path, vector) for item, vector in zip(pending, found, strict=True))
            pending = []
        return vectors, errors

    def embed_captions(self, records: list[PhotoRecord]) -> None:
        if self.texts is None:
            return
        needed = [record for record in records if record.caption and CAPTION_VECTOR not in record.vectors]
        if not needed:
            return
        started = time.perf_counter()
        try:
            captions = [record.caption or "" for record in needed]
            found = _patiently(
                lambda: self.texts.embed_texts(captions),  # type: ignore[union-attr]  # documents: no instruction
                self.limiter,
                self.max_wait,
                "captions",
            )
        finally:
            self.timed("captions", started)
        for record, vector in zip(needed, found, strict=True):
            record.vectors[CAPTION_VECTOR] = vector
        with self.lock:
            self.report.captions += len(needed)


def _reason(exc: ServiceError) -> str:
    # The service names the request's field (`images[3]`); the report names the file instead.
    return f"HTTP {exc.status}: {_FIELD.sub('the file', exc.message)}"


def index_folder(
    folder: str | os.PathLike,
    *,
    store: str | os.PathLike | PhotoStore = DEFAULT_STORE,
    service: str = DEFAULT_SERVICE,
    text_service: str | None = DEFAULT_TEXT_SERVICE,
    captions: str | os.PathLike | None = None,
    batch_size: int = 16,
    concurrency: int = 2,
    max_wait: float = 300.0,
    api_key: str | None = None,
    progress: bool | None = None,
    collection: str = "photos",
    timeout: float = 300.0,
    on_batch: Callable[[int], None] | None = None,
    retry_failed: bool = False,
    notify: Callable[[str], None] | None = None,
) -> IndexReport:
    """Index the photos under `folder` into `store` (a folder, ":memory:", or a Qdrant server's URL).

    `text_service` embeds captions (from the `captions` sidecar, or each photo's EXIF/XMP description)
    into each point's `caption` vector; None, or a service that does not answer, leaves captions as text
    only. `progress`: a progress bar on stderr (default: when stderr is a terminal), over every file found.
    `on_batch` is called with the number of files settled each time a batch has been written to the store.
    `retry_failed` sends files the service refused on an earlier run again, changed or not. `notify` is told
    what the store is doing when that takes a while (waiting for another process, a migration).
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    started = time.monotonic()
    api_key = api_key if api_key is not None else (os.environ.get("EMBED_API_KEY") or None)
    owned = not isinstance(store, PhotoStore)
    photo_store = (
        PhotoStore(store, collection, create=True, role="index", notify=notify) if owned else store  # type: ignore[arg-type]
    )
    report = IndexReport(str(root), photo_store.location)
    register_heif()
    images = EmbedClient(service, api_key=api_key, timeout=timeout, retries=0)
    texts = None
    try:
        health = _patiently(images.health, _Limiter(1), max_wait, f"the image service at {service}")
        sidecar = load_captions(captions, root) if captions is not None else {}
        texts, caption_size = _text_service(text_service, api_key, timeout, sidecar, report)
        if not photo_store.ensure(int(health["dimension"]), caption_size) and texts is not None:
            report.notes.append(
                f"the collection {collection!r} was created without caption vectors: captions are stored as text "
                "only (index into a new --store or --collection to embed them)"
            )
            texts.close()
            texts = None
        max_bytes = int(health.get("max_image_bytes") or 0)
        batch_size = max(1, min(batch_size, int(health.get("max_images_per_request") or batch_size)))

        prefix = str(root) + os.sep
        known = {r.path: r for r in photo_store.records(include_failed=True) if r.path.startswith(prefix)}
        files: list[_File] = []
        accepted = extensions_for(health)
        for path in walk(root, ALL_EXTENSIONS):
            try:
                stat = path.stat()
            except OSError as exc:  # gone since the walk saw it, or a broken link
                report.errors.append(FileError(str(path), f"could not be read: {exc.strerror or exc}"))
                continue
            item = _File(str(path), stat.st_size, stat.st_mtime_ns, sidecar.get(str(path)))
            if path.suffix.lower() not in accepted:
                taken = ", ".join(health.get("formats") or health.get("image_formats") or ())
                report.errors.append(FileError(item.path, f"not sent: the service does not take this format ({taken})"))
            elif max_bytes and item.size > max_bytes:
                report.errors.append(
                    FileError(item.path, f"too large: {item.size} bytes; the service takes at most {max_bytes}")
                )
            else:
                files.append(item)
        report.found = len(files) + len(report.errors)
        present = {item.path for item in files} | {error.path for error in report.errors}
        gone = [path for path in known if path not in present]
        photo_store.delete(gone + [error.path for error in report.errors if error.path in known])
        report.removed = len(gone)

        pending: list[_File] = []
        for item in files:
            before = known.get(item.path)
            caption_same = item.caption is None or (before is not None and before.caption == item.caption)
            if not (before and before.size == item.size and before.mtime_ns == item.mtime_ns and caption_same):
                pending.append(item)
            elif before.error is None:
                report.unchanged += 1
            elif retry_failed:
                pending.append(item)
            else:  # refused before and unchanged since: the same bytes would be refused again
                report.errors.append(FileError(item.path, before.error, earlier=True))
        batches = _batches(pending, batch_size, max_bytes or 32 * 2**20)
        worker = _Indexer(
            photo_store,
            images,
            texts,
            report,
            concurrency=concurrency,
            max_wait=max_wait,
            retry_failed=retry_failed,
        )
        # The bar counts every file found, so it ends at 100% however many were skipped or refused.
        bar = _progress_bar(report.found, progress, report)
        bar.advance(report.found - len(pending))
        _run(batches, worker, known, concurrency, bar, on_batch)
        optimizing = time.perf_counter()
        photo_store.optimize()
        report.timings["optimize"] += time.perf_counter() - optimizing
    finally:
        images.close()
        if texts is not None:
            texts.close()
        report.seconds = time.monotonic() - started
        if owned:
            photo_store.close()
    return report


def _text_service(
    url: str | None, api_key: str | None, timeout: float, sidecar: Mapping[str, str], report: IndexReport
) -> tuple[EmbedClient | None, int | None]:
    """The caption embedder and its vector size, if one answers; sidecar captions without one are an error."""
    if url is None:
        if sidecar:
            raise ValueError("captions were given but no text service to embed them (text_service=None)")
        return None, None
    client = EmbedClient(url, api_key=api_key, timeout=timeout, retries=0)
    try:
        health = client.health()
        return client, int(health["dimension"])
    except (Unreachable, ServiceError, KeyError, ValueError) as exc:
        client.close()
        if sidecar:
            raise Unreachable(f"captions were given, but the text service at {url} does not answer: {exc}") from exc
        report.notes.append(f"no text service at {url}: captions found in the photos are stored as text only")
        return None, None


def _batches(files: list[_File], batch_size: int, max_bytes: int) -> list[list[_File]]:
    """Consecutive files, at most batch_size per batch and about max_bytes of file data (one big file alone)."""
    batches: list[list[_File]] = []
    current: list[_File] = []
    size = 0
    for item in files:
        if current and (len(current) >= batch_size or size + item.size > max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        batches.append(current)
    return batches


class _Progress:
    def __init__(self, bar: Any, report: IndexReport) -> None:
        self.bar, self.report = bar, report

    def advance(self, count: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix(errors=len(self.report.errors), refresh=False)
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_bar(total: int, wanted: bool | None, report: IndexReport) -> _Progress:
    if wanted is None:
        wanted = sys.stderr.isatty()
    if not wanted or total == 0:
        return _Progress(None, report)
    try:
        from tqdm import tqdm
    except ImportError:  # the photos extra not installed: the summary line alone
        return _Progress(None, report)

    return _Progress(tqdm(total=total, unit="photo", desc="indexing", dynamic_ncols=True), report)


def _run(
    batches: list[list[_File]],
    worker: _Indexer,
    known: Mapping[str, PhotoRecord],
    concurrency: int,
    progress: _Progress,
    on_batch: Callable[[int], None] | None,
) -> None:
    """Batches through `concurrency` threads, at most one waiting batch per thread (bounded memory)."""
    queue = iter(batches)
    stop = threading.Event()
    door = threading.Thread(target=worker.doorman, args=(stop,), name="index-door", daemon=True)
    door.start()
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="index") as pool:
        running: set[Future[int]] = set()
        try:
            while True:
                while len(running) < 2 * max(1, concurrency):
                    batch = next(queue, None)
                    if batch is None:
                        break
                    running.add(pool.submit(worker.run_batch, batch, known))
                if not running:
                    break
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    settled = future.result()
                    progress.advance(settled)
                    if on_batch is not None:
                        on_batch(settled)
        except BaseException:
            for future in running:
                future.cancel()
            raise
        finally:
            stop.set()
            door.join()
            progress.close()
