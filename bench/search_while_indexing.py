"""A text search through the SigLIP2 service while a photo folder is being indexed into it (CPU).

    python bench/search_while_indexing.py --count 60
    python bench/search_while_indexing.py --count 60 --write BENCHMARKS.md

The image library's own flow: `embed_client.index_folder` sends the folder's photos (12-MP JPEGs, a few
2-MP ones and PNG screenshots, bench/index_corpus.py) to `POST /embed/images` in batches, while a person
searches by text, one short query at a time on `POST /embed/text` (SigLIP2's text tower, the same queue
and model thread as the images). Measured: the searches' p50/p99 idle, then next to the indexing, and the
photos/s the indexing gets meanwhile. The model is the photos-cpu profile's (random weights of
google/siglip2-base-patch16-224's shape, built here; no download). On 2 cores the searches share the CPU
with decoding 12-MP JPEGs, not only the model's queue.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from cpu_serving import append_report, machine, sentences  # noqa: E402
from index_corpus import corpus  # noqa: E402
from index_cpu import base_224_checkpoint  # noqa: E402
from latency import percentile, searches  # noqa: E402

from embed_client import index_folder  # noqa: E402


def figures(latencies: list[float]) -> dict[str, float]:
    return {"p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=60, help="photos in the generated folder")
    parser.add_argument("--searches", type=int, default=60)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between one person's searches")
    parser.add_argument("--write", type=Path, help="append the results (markdown) to this file")
    args = parser.parse_args()

    from tests.conftest import serve

    work = Path(tempfile.mkdtemp(prefix="search-indexing-"))
    corpus(work / "photos", args.count)
    model = base_224_checkpoint(work / "siglip2-base-224-random")
    queries = [" ".join(text.split()[:6]) for text in sentences(args.searches, seed=5)]  # a person's query
    env = {"SIGLIP2_EMBED_MODEL": str(model), "SIGLIP2_EMBED_DEVICE": "cpu"}
    for served in serve("Siglip2Embed", env, work / "siglip.log", timeout=900):
        url = f"{served.url}/embed/text"
        asyncio.run(searches(url, queries[:10], args.pause))  # warm-up
        idle = asyncio.run(searches(url, queries, args.pause))
        # The indexing client in a process of its own, as it would be: in this one, its work on each batch of
        # photos (reading tens of MB, encoding the request) would share the GIL with the searches' own client.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            options = {"store": work / "store", "service": served.url, "text_service": None, "progress": False}
            indexing = pool.submit(index_folder, work / "photos", **options)
            time.sleep(5)  # the indexing's first batches are in the queue
            during: list[float] = []
            while not indexing.done() and len(during) < args.searches:
                during += asyncio.run(searches(url, queries[len(during) : len(during) + 5], args.pause))
            result = indexing.result()
    row = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "photos": result.embedded,
        "photos_per_s": result.embedded / result.seconds,
        "idle": figures(idle),
        "while_indexing": {
            **figures(during),
            "searches": len(during),
            "each_ms": [round(1000 * seconds) for seconds in during],
        },
    }
    row["p99_while_indexing_over_idle_p50"] = row["while_indexing"]["p99_ms"] / row["idle"]["p50_ms"]
    print(json.dumps(row, indent=1))
    lines = [
        f"### A text search while a photo folder is indexed, SigLIP2 on the CPU ({row['date']})",
        "",
        f"Machine: {row['machine']}. Command: `python bench/search_while_indexing.py --count {args.count}` "
        f"(random weights of siglip2-base-patch16-224's shape; {result.embedded} photos, {len(during)} searches "
        f"during the indexing, a {args.pause:.1f} s pause between searches).",
        "",
        "| | p50 ms | p99 ms |",
        "|---|---|---|",
        f"| search, idle | {row['idle']['p50_ms']:.1f} | {row['idle']['p99_ms']:.1f} |",
        f"| search, while indexing | {row['while_indexing']['p50_ms']:.1f} | {row['while_indexing']['p99_ms']:.1f} |",
        "",
        f"p99 while indexing / idle p50: **{row['p99_while_indexing_over_idle_p50']:.2f}**; the indexing meanwhile: "
        f"{row['photos_per_s']:.2f} photos/s.",
    ]
    print("\n".join(lines))
    append_report(args.write, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
