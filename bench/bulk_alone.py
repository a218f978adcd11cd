"""Bulk work alone through HTTP: what the queue's slices cost an indexing job when nobody searches.

    python bench/bulk_alone.py                      # the server from this checkout
    python /other/checkout/bench/bulk_alone.py      # the same from another checkout, to compare

`BGE_EMBED_MODEL=demo bentoml serve service:BgeEmbed` (CPU); 30 searches first (so that the queue knows a lone
request's compute time, as a running service does), then 2 connections sending `POST /embed/texts` with 64
captions of 18-90 words each, back to back: a warm-up of 4 requests, then twice 16 requests; texts/s of each.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_serving import REPO, _Connection, http_post, long_captions, sentences, start_demo_service, stop  # noqa: E402

BULK_TEXTS = 64


def bulk_batches() -> list[list[str]]:
    captions = long_captions(BULK_TEXTS * 8)
    return [captions[i : i + BULK_TEXTS] for i in range(0, BULK_TEXTS * 8, BULK_TEXTS)]


async def searches(port: int, count: int) -> None:
    connection = await _Connection.open("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}/embed/text"
    for text in sentences(count, seed=1):
        await connection.exchange(http_post(url, {"text": text}))
    connection.close()


async def bulk(port: int, requests: int, clients: int = 2) -> float:
    """texts/s of `requests` bulk requests over `clients` connections."""
    url = f"http://127.0.0.1:{port}/embed/texts"
    bodies = [http_post(url, {"texts": batch}) for batch in bulk_batches()]
    connections = [await _Connection.open("127.0.0.1", port) for _ in range(clients)]

    async def client(connection: _Connection, first: int) -> None:
        for index in range(first, requests, clients):
            status, _ = await connection.exchange(bodies[index % len(bodies)])
            if status != 200:
                raise RuntimeError(f"a bulk request got {status}")

    started = time.perf_counter()
    await asyncio.gather(*(client(connection, first) for first, connection in enumerate(connections)))
    seconds = time.perf_counter() - started
    for connection in connections:
        connection.close()
    return requests * BULK_TEXTS / seconds


def main() -> None:
    process, port = start_demo_service(REPO / "bench" / "logs" / "bulk_alone.log")
    try:
        asyncio.run(searches(port, 30))
        asyncio.run(bulk(port, 4))
        rates = [asyncio.run(bulk(port, 16)) for _ in range(2)]
    finally:
        stop(process)
    print(f"server from {REPO}: bulk texts/s {', '.join(f'{rate:.1f}' for rate in rates)}")


if __name__ == "__main__":
    main()
