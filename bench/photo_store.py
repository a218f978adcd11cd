"""The photo index at the size of a real library: embedded vector stores side by side on the same points.

    python bench/photo_store.py --sizes 20000,100000 --write BENCHMARKS.md
    python bench/photo_store.py --sizes 300000,1000000 --engines edge,numpy

Each store is filled with N points of `embed_client/store.py`'s layout: a 1152-d `image` vector (SigLIP2
so400m) per photo and a 4096-d `caption` vector (Qwen3-Embedding-8B, the default caption embedder) for a
third of them, with the payload the indexer writes (path, size, mtime, SHA-256, EXIF capture date for 80%,
caption text). The vectors cluster like image embeddings: 60 topics, 3,000 scenes among them, photos
scattered around the scenes at different spreads, plus a direction every vector shares (embeddings are not
centred). Queries: 100 held-out photos (`--like`) and 100 text-like vectors (a scene's direction mixed
with a "text" direction the photos do not have, as SigLIP's text vectors lie apart from its image vectors:
the cosines of a match are ~0.2, not ~0.7).

Per engine and N: writes (batches of 64, as points/s; the index build after, in seconds); in a fresh
process, opening the store and the first search (imports included: what `python -m embed_client search`
waits for), resident memory after that, top-20 search p50/p95, top-20 search with a one-year capture-date
filter p50/p95, recall@20 against exact search (numpy, float32), and the store's size on disk.

Engines: `legacy` (qdrant-client's local mode, the store before issue 22), `edge` (Qdrant Edge, the store
now: embed_client.store's own configuration), `lancedb` (LanceDB, IVF_HNSW_SQ), `numpy` (the floor: the
picture vectors in RAM, scanned exactly; caption vectors mapped from disk).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from embed_client.store import point_id as store_point_id  # noqa: E402

IMAGE_DIM, CAPTION_DIM = 1152, 4096
BATCH = 64
CHUNK = 6400  # points generated at a time (outside the timed writes)
TOPICS, SCENES = 60, 3000
QUERIES = 100  # of each kind
TOP = 20
FILTER = ("2019-01-01T00:00:00", "2020-01-01T00:00:00")  # --after 2019-01-01 --before 2020-01-01
ENGINES = ("legacy", "edge", "lancedb", "numpy")


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


class Corpus:
    """N points, generated chunk by chunk from a seed (the same points for every engine)."""

    def __init__(self, n: int, seed: int = 7) -> None:
        self.n, self.seed = n, seed
        rng = np.random.default_rng(seed)
        shared = unit(rng.normal(size=IMAGE_DIM).astype(np.float32))
        topics = unit(unit(rng.normal(size=(TOPICS, IMAGE_DIM)).astype(np.float32)) + 0.8 * shared)
        noise = unit(rng.normal(size=(SCENES, IMAGE_DIM)).astype(np.float32))
        self.scenes = unit(topics[rng.integers(0, TOPICS, SCENES)] + 0.9 * noise)
        self.text_direction = unit(rng.normal(size=IMAGE_DIM).astype(np.float32))
        self.caption_scenes = unit(rng.normal(size=(SCENES, CAPTION_DIM)).astype(np.float32))

    def photos(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        scene = rng.integers(0, SCENES, count)
        spread = rng.uniform(0.5, 1.1, (count, 1)).astype(np.float32)
        noise = unit(rng.normal(size=(count, IMAGE_DIM)).astype(np.float32))
        return unit(self.scenes[scene] + spread * noise).astype(np.float32), scene

    def chunks(self) -> Iterator[dict[str, Any]]:
        for start in range(0, self.n, CHUNK):
            count = min(CHUNK, self.n - start)
            rng = np.random.default_rng([self.seed, start])
            image, scene = self.photos(rng, count)
            captioned = np.arange(start, start + count) % 3 == 0
            caption = unit(
                self.caption_scenes[scene[captioned]]
                + 0.8 * unit(rng.normal(size=(int(captioned.sum()), CAPTION_DIM)).astype(np.float32))
            ).astype(np.float32)
            days = rng.integers(0, 20 * 365, count)  # 2005..2024
            dated = rng.random(count) < 0.8
            payloads = []
            for i in range(count):
                number = start + i
                taken = dt.datetime(2005, 1, 1) + dt.timedelta(days=int(days[i]), seconds=int(number % 86400))
                payloads.append(
                    {
                        "path": path_of(number),
                        "size": 2_000_000 + int(number * 7919 % 3_000_000),
                        "mtime_ns": 1_700_000_000_000_000_000 + number,
                        "sha256": f"{number:064x}",
                        "taken_at": taken.isoformat() if dated[i] else None,
                        "caption": f"scene {scene[i]}: a photo of something, number {number}" if captioned[i] else None,
                    }
                )
            yield {"start": start, "image": image, "captioned": captioned, "caption": caption, "payloads": payloads}

    def queries(self) -> tuple[np.ndarray, np.ndarray]:
        """Image-space queries (photos, then texts), and the texts' caption-space queries (for fused searches)."""
        rng = np.random.default_rng([self.seed, 10**9])
        like, _ = self.photos(rng, QUERIES)
        scene = rng.integers(0, SCENES, QUERIES)
        noise = unit(rng.normal(size=(QUERIES, IMAGE_DIM)).astype(np.float32))
        text = unit(0.35 * self.scenes[scene] + 0.9 * self.text_direction + 0.25 * noise)
        caption_noise = unit(rng.normal(size=(QUERIES, CAPTION_DIM)).astype(np.float32))
        caption = unit(self.caption_scenes[scene] + 0.8 * caption_noise).astype(np.float32)
        return np.concatenate([like, text]).astype(np.float32), caption


def exact(corpus: Corpus, queries: np.ndarray, dated_between: tuple[str, str] | None = None) -> np.ndarray:
    """The true top-20 point numbers for each query (numpy, float32), over the chunks."""
    best_scores = np.full((len(queries), TOP), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), TOP), -1, dtype=np.int64)
    for chunk in corpus.chunks():
        scores = queries @ chunk["image"].T
        if dated_between is not None:
            keep = np.array([dated_between[0] <= (p["taken_at"] or "") < dated_between[1] for p in chunk["payloads"]])
            scores[:, ~keep] = -np.inf
        ids = np.arange(chunk["start"], chunk["start"] + len(chunk["payloads"]))
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_ids = np.concatenate([best_ids, np.broadcast_to(ids, scores.shape)], axis=1)
        order = np.argsort(-merged_scores, axis=1)[:, :TOP]
        best_scores = np.take_along_axis(merged_scores, order, axis=1)
        best_ids = np.take_along_axis(merged_ids, order, axis=1)
    return best_ids


def path_of(number: int) -> str:
    return f"/home/someone/Pictures/{number // 1000:04d}/IMG_{number:07d}.jpg"


def point_id(number: int) -> str:
    """The store's own id of a photo (uuid5 of its path), in every engine."""
    return store_point_id(path_of(number))


# -- filling each engine ----------------------------------------------------------------------------------


def fill_legacy(folder: Path, corpus: Corpus) -> dict[str, float]:
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(folder))
    client.create_collection(
        "photos",
        vectors_config={
            "image": models.VectorParams(size=IMAGE_DIM, distance=models.Distance.COSINE),
            "caption": models.VectorParams(size=CAPTION_DIM, distance=models.Distance.COSINE),
        },
    )
    seconds = 0.0
    for chunk in corpus.chunks():
        points = []
        caption_rows = iter(chunk["caption"])
        for i, payload in enumerate(chunk["payloads"]):
            vector = {"image": chunk["image"][i].tolist()}
            if chunk["captioned"][i]:
                vector["caption"] = next(caption_rows).tolist()
            points.append(models.PointStruct(id=point_id(chunk["start"] + i), vector=vector, payload=payload))
        started = time.perf_counter()
        for b in range(0, len(points), BATCH):
            client.upsert("photos", points=points[b : b + BATCH], wait=True)
        seconds += time.perf_counter() - started
    client.close()
    return {"write_s": seconds, "build_s": 0.0}


def fill_edge(folder: Path, corpus: Corpus) -> dict[str, float]:
    from embed_client.store import EdgeStore, PhotoRecord

    seconds = 0.0
    with EdgeStore(folder, create=True) as store:
        store.ensure(IMAGE_DIM, CAPTION_DIM)
        for chunk in corpus.chunks():
            records = []
            caption_rows = iter(chunk["caption"])
            for i, payload in enumerate(chunk["payloads"]):
                record = PhotoRecord(**payload)
                record.vectors["image"] = chunk["image"][i].tolist()
                if chunk["captioned"][i]:
                    record.vectors["caption"] = next(caption_rows).tolist()
                records.append(record)
            started = time.perf_counter()
            for b in range(0, len(records), BATCH):
                store.upsert(records[b : b + BATCH])
            seconds += time.perf_counter() - started
        started = time.perf_counter()
        store.flush()
        seconds += time.perf_counter() - started
        started = time.perf_counter()
        store.optimize()
        build = time.perf_counter() - started
    return {"write_s": seconds, "build_s": build}


LANCE_PARTITIONS_PER_POINT = 1 / 4096  # ~4k points per IVF partition; sqrt(N) partitions measured no better


def fill_lancedb(folder: Path, corpus: Corpus) -> dict[str, float]:
    import lancedb
    import pyarrow as pa

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("path", pa.string()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("sha256", pa.string()),
            ("taken_at", pa.timestamp("s")),
            ("caption", pa.string()),
            ("image", pa.list_(pa.float32(), IMAGE_DIM)),
            ("caption_vector", pa.list_(pa.float32(), CAPTION_DIM)),
        ]
    )
    db = lancedb.connect(str(folder))
    table = db.create_table("photos", schema=schema)
    seconds = 0.0
    for chunk in corpus.chunks():
        caption_rows = iter(chunk["caption"])
        rows = []
        for i, payload in enumerate(chunk["payloads"]):
            taken = payload["taken_at"]
            rows.append(
                {
                    "id": point_id(chunk["start"] + i),
                    **{key: payload[key] for key in ("path", "size", "mtime_ns", "sha256", "caption")},
                    "taken_at": dt.datetime.fromisoformat(taken) if taken else None,
                    "image": chunk["image"][i],
                    "caption_vector": next(caption_rows) if chunk["captioned"][i] else None,
                }
            )
        started = time.perf_counter()
        for b in range(0, len(rows), BATCH):
            # merge_insert: an upsert by id, what re-indexing a photo needs (add() would duplicate it)
            table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(
                rows[b : b + BATCH]
            )
        seconds += time.perf_counter() - started
    started = time.perf_counter()
    table.optimize()  # compact the many small fragments the batches wrote
    seconds += time.perf_counter() - started
    started = time.perf_counter()
    partitions = max(1, round(corpus.n * LANCE_PARTITIONS_PER_POINT))
    table.create_index(metric="cosine", vector_column_name="image", index_type="IVF_HNSW_SQ", num_partitions=partitions)
    table.create_scalar_index("taken_at", index_type="BTREE")
    table.create_scalar_index("id", index_type="BTREE")
    build = time.perf_counter() - started
    return {"write_s": seconds, "build_s": build}


def fill_numpy(folder: Path, corpus: Corpus) -> dict[str, float]:
    folder.mkdir(parents=True)
    image = np.lib.format.open_memmap(folder / "image.npy", mode="w+", dtype=np.float32, shape=(corpus.n, IMAGE_DIM))
    captioned = (corpus.n + 2) // 3
    caption = np.lib.format.open_memmap(
        folder / "caption.npy", mode="w+", dtype=np.float32, shape=(captioned, CAPTION_DIM)
    )
    days = np.full(corpus.n, -1, dtype=np.int64)
    seconds = 0.0
    for chunk in corpus.chunks():
        started = time.perf_counter()
        count = len(chunk["payloads"])
        image[chunk["start"] : chunk["start"] + count] = chunk["image"]
        first = (chunk["start"] + 2) // 3  # every third point has a caption: numbers 0, 3, 6, ...
        caption[first : first + len(chunk["caption"])] = chunk["caption"]
        for i, payload in enumerate(chunk["payloads"]):
            if payload["taken_at"]:
                days[chunk["start"] + i] = int(dt.datetime.fromisoformat(payload["taken_at"]).timestamp())
        seconds += time.perf_counter() - started
    started = time.perf_counter()
    image.flush()
    caption.flush()
    del image, caption
    np.save(folder / "taken_at.npy", days)
    seconds += time.perf_counter() - started
    return {"write_s": seconds, "build_s": 0.0}


FILL = {"legacy": fill_legacy, "edge": fill_edge, "lancedb": fill_lancedb, "numpy": fill_numpy}


# -- searching, in a fresh process -------------------------------------------------------------------------


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


POOL = 3 * TOP  # candidates per list for a fused search, as `search` asks (3 x top)


def numpy_rrf(lists: list[np.ndarray]) -> list[int]:
    scores: dict[int, float] = {}
    for ranked in lists:
        for rank, number in enumerate(ranked.tolist(), 1):
            scores[number] = scores.get(number, 0.0) + 1 / (60 + rank)
    return sorted(scores, key=lambda number: -scores[number])[:POOL]


def searcher(engine: str, folder: Path) -> tuple[Any, Any, Any]:
    """For one engine: search(vector, filtered) -> point numbers or ids; fused(image, caption) (a text search
    of a library with captions, the default of `search`: both lists, fused by RRF), or None; the store."""
    after, before = FILTER
    if engine == "legacy":
        from qdrant_client import QdrantClient, models

        client = QdrantClient(path=str(folder))
        date_filter = models.Filter(
            must=[models.FieldCondition(key="taken_at", range=models.DatetimeRange(gte=after, lt=before))]
        )

        def search(vector: np.ndarray, filtered: bool) -> list[str]:
            found = client.query_points(
                "photos",
                query=vector.tolist(),
                using="image",
                limit=TOP,
                query_filter=date_filter if filtered else None,
            )
            return [str(point.id) for point in found.points]

        def fused(image: np.ndarray, caption: np.ndarray) -> list[str]:
            lists = [
                models.Prefetch(query=vector.tolist(), using=name, limit=POOL)
                for name, vector in (("image", image), ("caption", caption))
            ]
            rrf = models.RrfQuery(rrf=models.Rrf(k=61))
            found = client.query_points("photos", prefetch=lists, query=rrf, limit=POOL)
            return [str(point.id) for point in found.points]

        return search, fused, client
    if engine == "edge":
        from embed_client.store import EdgeStore

        store = EdgeStore(folder)

        def search(vector: np.ndarray, filtered: bool) -> list[str]:
            bounds = {"after": after, "before": before} if filtered else {}
            hits = store.search(vector.tolist(), "image", TOP, **bounds)
            return [hit.point_id for hit in hits]

        def fused(image: np.ndarray, caption: np.ndarray) -> list[str]:  # what `search` asks of the store
            found = store.query(image=image.tolist(), caption=caption.tolist(), limit=POOL, pool=POOL)
            store.copies(hit.record.sha256 for hit in found.fused)
            return [hit.point_id for hit in found.fused]

        return search, fused, store
    if engine == "lancedb":
        import lancedb

        table = lancedb.connect(str(folder)).open_table("photos")
        where = (
            f"taken_at >= timestamp '{after.replace('T', ' ')}' AND taken_at < timestamp '{before.replace('T', ' ')}'"
        )

        def search(vector: np.ndarray, filtered: bool) -> list[str]:
            query = table.search(vector, vector_column_name="image").metric("cosine").limit(TOP).nprobes(LANCE_NPROBES)
            query = query.ef(LANCE_EF).select(["id"])
            if filtered:
                query = query.where(where, prefilter=True)
            return query.to_arrow()["id"].to_pylist()

        return search, None, table
    # The pictures' vectors in RAM; the captions' mapped from disk (10 GB of RAM at 1,000,000 points otherwise).
    image, caption = np.load(folder / "image.npy"), np.load(folder / "caption.npy", mmap_mode="r")
    days = np.load(folder / "taken_at.npy")
    low, high = (int(dt.datetime.fromisoformat(value).timestamp()) for value in FILTER)

    def search(vector: np.ndarray, filtered: bool) -> list[int]:
        if filtered:
            rows = np.flatnonzero((days >= low) & (days < high))
            scores = image[rows] @ vector
            best = np.argpartition(-scores, TOP)[:TOP]
            return rows[best[np.argsort(-scores[best])]].tolist()
        scores = image @ vector
        best = np.argpartition(-scores, TOP)[:TOP]
        return best[np.argsort(-scores[best])].tolist()

    def fused(image_query: np.ndarray, caption_query: np.ndarray) -> list[int]:
        lists = []
        for matrix, vector, numbers in ((image, image_query, 1), (caption, caption_query, 3)):
            scores = matrix @ vector
            best = np.argpartition(-scores, POOL)[:POOL]
            lists.append(best[np.argsort(-scores[best])] * numbers)  # caption row i is photo 3 * i
        return numpy_rrf(lists)

    return search, fused, image


LANCE_NPROBES, LANCE_EF = 20, 128


def measure(engine: str, folder: Path, work: Path) -> dict[str, Any]:
    """Run in a fresh process: the timings, memory and recall of one filled store."""
    queries, caption_queries = np.load(work / "queries.npy"), np.load(work / "caption_queries.npy")
    truth, filtered_truth = np.load(work / "truth.npy"), np.load(work / "filtered_truth.npy")
    started = time.perf_counter()
    search, fused, _store = searcher(engine, folder)
    search(queries[0], False)
    opened = time.perf_counter() - started
    rss_open = rss_mb()
    ids: dict[str, int] = {}
    if engine != "numpy":
        ids = {point_id(number): number for number in np.unique(np.concatenate([truth, filtered_truth])).tolist()}

    def run(filtered: bool, expected: np.ndarray) -> tuple[list[float], list[float]]:
        latencies, recalls = [], []
        for query, want in zip(queries, expected, strict=True):
            begun = time.perf_counter()
            found = search(query, filtered)
            latencies.append(time.perf_counter() - begun)
            numbers = set(found) if engine == "numpy" else {ids.get(str(item), -1) for item in found}
            wanted = {int(number) for number in want if number >= 0}
            recalls.append(len(numbers & wanted) / max(1, len(wanted)))
        return latencies, recalls

    plain_latency, plain_recall = run(False, truth)
    filtered_latency, filtered_recall = run(True, filtered_truth)
    half = len(queries) // 2
    both: dict[str, float | None] = {}
    for run_name in ("first", "warm"):  # the caption vectors' first touch reads them from disk; then the cache
        fused_latency = []
        for image, caption in zip(queries[half:], caption_queries, strict=True) if fused else ():
            begun = time.perf_counter()
            fused(image, caption)
            fused_latency.append(time.perf_counter() - begun)
        for quantile in (50, 95):
            value = 1000 * float(np.percentile(fused_latency, quantile)) if fused_latency else None
            both[f"fused_{run_name}_p{quantile}_ms"] = value
    return {
        **both,
        "open_first_search_s": opened,
        "rss_after_open_mb": rss_open,
        "rss_after_searches_mb": rss_mb(),
        "search_p50_ms": 1000 * float(np.percentile(plain_latency, 50)),
        "search_p95_ms": 1000 * float(np.percentile(plain_latency, 95)),
        "filtered_p50_ms": 1000 * float(np.percentile(filtered_latency, 50)),
        "filtered_p95_ms": 1000 * float(np.percentile(filtered_latency, 95)),
        "recall_photo_queries": float(np.mean(plain_recall[:half])),
        "recall_text_queries": float(np.mean(plain_recall[half:])),
        "recall_filtered": float(np.mean(filtered_recall)),
    }


def disk_mb(folder: Path) -> float:
    """Space the files take (allocated blocks, as `du`: write-ahead logs are preallocated sparse files)."""
    return sum(path.stat().st_blocks * 512 for path in folder.rglob("*") if path.is_file()) / 2**20


# -- the run -----------------------------------------------------------------------------------------------


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    memory = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    return f"{os.cpu_count()} CPUs ({cpu}), {int(memory) / 2**20:.0f} GiB, Python {platform.python_version()}"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("qdrant-edge-py", "qdrant-client", "lancedb", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"### The photo store at library size, {results['date']}",
        "",
        f"- machine: {results['machine']}; load average before: {results['load_before']}, after: "
        f"{results['load_after']}",
        f"- command: `{results['command']}`",
        f"- versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}",
        "",
        "| N | engine | write pts/s | index build s | open + 1st search s | RSS after open MB | search p50/p95 ms "
        "| 1-year filter p50/p95 ms | fused text search p50/p95 ms, first pass (again) "
        "| recall@20 photo/text/filtered | disk MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['n']:,} | {row['engine']} | {row['error']} |||||||| ")
            continue
        fused = "-"
        if row.get("fused_first_p50_ms") is not None:
            fused = (
                f"{row['fused_first_p50_ms']:.1f} / {row['fused_first_p95_ms']:.1f} "
                f"({row['fused_warm_p50_ms']:.1f} / {row['fused_warm_p95_ms']:.1f})"
            )
        lines.append(
            f"| {row['n']:,} | {row['engine']} | {row['n'] / row['write_s']:,.0f} | {row['build_s']:.1f} "
            f"| {row['open_first_search_s']:.2f} | {row['rss_after_open_mb']:.0f} "
            f"| {row['search_p50_ms']:.1f} / {row['search_p95_ms']:.1f} "
            f"| {row['filtered_p50_ms']:.1f} / {row['filtered_p95_ms']:.1f} | {fused} "
            f"| {row['recall_photo_queries']:.3f} / {row['recall_text_queries']:.3f} / {row['recall_filtered']:.3f} "
            f"| {row['disk_mb']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20000,100000", help="comma-separated point counts")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--legacy-max", type=int, default=20000, help="largest N for the old local mode")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/photo-store-bench"), help="where the stores go")
    parser.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--write", type=Path, help="append the results (markdown) to this file")
    parser.add_argument("--measure", nargs=3, metavar=("ENGINE", "STORE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        engine, store, work = args.measure
        print(json.dumps(measure(engine, Path(store), Path(work))))
        return

    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "versions": versions(),
        "command": "python bench/photo_store.py " + " ".join(sys.argv[1:]),
        "load_before": " ".join(f"{value:.2f}" for value in os.getloadavg()),
        "rows": [],
    }
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    for n in (int(size) for size in args.sizes.split(",")):
        corpus = Corpus(n)
        work = args.dir / f"n{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        queries, caption_queries = corpus.queries()
        np.save(work / "queries.npy", queries)
        np.save(work / "caption_queries.npy", caption_queries)
        np.save(work / "truth.npy", exact(corpus, queries))
        np.save(work / "filtered_truth.npy", exact(corpus, queries, FILTER))
        for engine in engines:
            if engine == "legacy" and n > args.legacy_max:
                continue
            folder = work / engine
            print(f"N={n:,} {engine}: writing", file=sys.stderr, flush=True)
            row: dict[str, Any] = {"n": n, "engine": engine}
            try:
                row.update(FILL[engine](folder, corpus))
            except MemoryError as exc:
                row["error"] = f"out of memory while writing: {exc}"
                results["rows"].append(row)
                continue
            command = [sys.executable, __file__, "--measure", engine, str(folder), str(work)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                row["error"] = f"search process failed ({done.returncode}): {done.stderr.strip()[-300:]}"
            else:
                row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            row["disk_mb"] = disk_mb(folder)
            print(json.dumps(row), file=sys.stderr, flush=True)
            results["rows"].append(row)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    results["load_after"] = " ".join(f"{value:.2f}" for value in os.getloadavg())
    text = markdown(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.write:
        with args.write.open("a", encoding="utf-8") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
