"""One search's latency through a running service, idle and next to bulk work (CPU, BGE on MiniLM weights).

    python bench/latency.py                      # 200 searches idle, then 200 next to bulk indexing
    python bench/latency.py --write BENCHMARKS.md

An image library's search sends one short text and waits; an indexing job sends many texts per request.
This measures, through HTTP (`BGE_EMBED_MODEL=demo bentoml serve service:BgeEmbed`):

- idle: one search at a time, `POST /embed/text` with a 6-30-word caption; p50/p99;
- next to bulk: `--bulk-clients` connections each sending `POST /embed/texts` with `--bulk-texts` longer
  captions, back to back, and one search at a time beside it (a pause of 20 ms between
  searches, as a person typing); the searches' p50/p99 and the bulk texts/s meanwhile.

The figure the speed issue asks for is the searches' p99 next to bulk over their idle p50 (at most
about 3). Bulk work alone is bench/bulk_alone.py's. Run it from another checkout
(`python /path/to/that/bench/latency.py`) to compare schedulers: the server starts from the script's repository.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_serving import (
    REPO,
    _Connection,
    append_report,
    http_post,
    long_captions,
    machine,
    sentences,
    start_demo_service,
    stop,
)  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def searches(url: str, texts: list[str], pause: float) -> list[float]:
    """One search at a time on one keep-alive connection; each one's latency in seconds."""
    parts = urllib.parse.urlsplit(url)
    connection = await _Connection.open(parts.hostname, parts.port)
    latencies = []
    try:
        for text in texts:
            request = http_post(url, {"text": text})
            started = time.perf_counter()
            status, _ = await connection.exchange(request)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"a search got {status}")
            await asyncio.sleep(pause)
    finally:
        connection.close()
    return latencies


async def bulk(url: str, batches: list[list[str]], clients: int, stop_event: asyncio.Event) -> int:
    """`clients` connections sending the batches back to back until stop_event; the texts answered."""
    parts = urllib.parse.urlsplit(url)
    requests = [http_post(url, {"texts": batch}) for batch in batches]
    done = 0

    async def client(index: int) -> None:
        nonlocal done
        connection = await _Connection.open(parts.hostname, parts.port)
        try:
            position = index
            while not stop_event.is_set():
                status, _ = await connection.exchange(requests[position % len(requests)])
                if status != 200:
                    raise RuntimeError(f"a bulk request got {status}")
                done += len(batches[position % len(batches)])
                position += clients
        finally:
            connection.close()

    await asyncio.gather(*(client(index) for index in range(clients)))
    return done


async def next_to_bulk(base: str, queries: list[str], batches: list[list[str]], clients: int, pause: float) -> dict:
    stop_event = asyncio.Event()
    started = time.perf_counter()
    load = asyncio.ensure_future(bulk(f"{base}/embed/texts", batches, clients, stop_event))
    await asyncio.sleep(1.0)  # the bulk load is running
    latencies = await searches(f"{base}/embed/text", queries, pause)
    stop_event.set()
    texts = await load
    return {"latencies": latencies, "bulk_texts_per_s": texts / (time.perf_counter() - started)}


def run(args: argparse.Namespace) -> dict:
    queries = sentences(args.searches, seed=1)
    captions = long_captions(args.bulk_texts * 8)
    batches = [captions[i : i + args.bulk_texts] for i in range(0, len(captions), args.bulk_texts)]
    process, port = start_demo_service(REPO / "bench" / "logs" / "latency.log")
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(searches(f"{base}/embed/text", queries[:20], 0.0))  # warm-up
        idle = asyncio.run(searches(f"{base}/embed/text", queries, args.pause))
        mixed = asyncio.run(next_to_bulk(base, queries, batches, args.bulk_clients, args.pause))
    finally:
        stop(process)
    idle_p50 = statistics.median(idle)
    return {
        "repository": str(REPO),
        "searches": args.searches,
        "bulk": f"{args.bulk_clients} clients x {args.bulk_texts} texts per request",
        "idle_p50_ms": 1000 * idle_p50,
        "idle_p99_ms": 1000 * percentile(idle, 0.99),
        "loaded_p50_ms": 1000 * statistics.median(mixed["latencies"]),
        "loaded_p99_ms": 1000 * percentile(mixed["latencies"], 0.99),
        "loaded_p99_over_idle_p50": percentile(mixed["latencies"], 0.99) / idle_p50,
        "bulk_next_to_searches_texts_per_s": mixed["bulk_texts_per_s"],
    }


def markdown(result: dict, conditions: str) -> str:
    rows = [
        f"### One search next to bulk work, CPU ({dt.date.today()})",
        "",
        f"Machine: {machine()}. {conditions}".strip(),
        f"Command: `python bench/latency.py` (server from {result['repository']}); bulk: {result['bulk']}.",
        "",
        "| searches | p50 ms | p99 ms |",
        "|---|---|---|",
        f"| idle | {result['idle_p50_ms']:.1f} | {result['idle_p99_ms']:.1f} |",
        f"| next to bulk | {result['loaded_p50_ms']:.1f} | {result['loaded_p99_ms']:.1f} |",
        "",
        f"p99 next to bulk / idle p50: **{result['loaded_p99_over_idle_p50']:.2f}**. Bulk texts/s next to the "
        f"searches {result['bulk_next_to_searches_texts_per_s']:.1f}.",
        "",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--bulk-clients", type=int, default=2)
    parser.add_argument("--bulk-texts", type=int, default=64, help="texts per bulk request")
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between one search and the next")
    parser.add_argument("--conditions", default="", help="a note on the machine's load, for the record")
    parser.add_argument("--write", type=Path, help="append the results (markdown) to this file")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    append_report(args.write, markdown(result, args.conditions))


if __name__ == "__main__":
    main()
