"""Short captions through the CPU service with the clients people use, against the same model in process.

    python bench/cpu_clients.py                   # aiohttp, httpx and the lean client, 32 connections each
    python bench/cpu_clients.py --write BENCHMARKS.md

The BGE service on the bundled MiniLM weights (`BGE_EMBED_MODEL=demo`), one 6-30-word caption per
`POST /embed/text`, 32 concurrent connections, with:
- aiohttp (`ClientSession`, a connector of 32 connections) and httpx (`AsyncClient`, 32 connections),
  each request built and its JSON answer parsed by the client as an application would;
- bench/cpu_serving.py's lean client (requests prepared as bytes), for comparison with earlier rows.
The ceiling is sentence-transformers `encode(batch_size=32)` on the same texts in process, measured before
and after the service (the better of the two is used: the strictest ratio). Clients run one after another.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_serving import REPO, _load, append_report, machine, measure_in_process, sentences, start_demo_service, stop  # noqa: E402

CONNECTIONS = 32


async def with_aiohttp(url: str, texts: list[str]) -> list[float]:
    import aiohttp

    latencies: list[float] = []
    queue = list(reversed(texts))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session:

        async def worker() -> None:
            while queue:
                text = queue.pop()
                started = time.perf_counter()
                async with session.post(url, json={"text": text}) as answer:
                    body = await answer.json()
                    if answer.status != 200 or len(body["embedding"]) == 0:
                        raise RuntimeError(f"status {answer.status}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    return latencies


async def with_httpx(url: str, texts: list[str]) -> list[float]:
    import httpx

    latencies: list[float] = []
    queue = list(reversed(texts))
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def worker() -> None:
            while queue:
                text = queue.pop()
                started = time.perf_counter()
                answer = await client.post(url, json={"text": text})
                if answer.status_code != 200 or len(answer.json()["embedding"]) == 0:
                    raise RuntimeError(f"status {answer.status_code}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    return latencies


async def with_lean(url: str, texts: list[str]) -> list[float]:
    row = await _load(url, [{"text": text} for text in texts], CONNECTIONS)
    if row["errors"]:
        raise RuntimeError(f"{row['errors']} errors")
    return [row["seconds"] / len(texts)] * len(texts)  # only its total time is used below


CLIENTS = {"aiohttp": with_aiohttp, "httpx": with_httpx, "lean": with_lean}


def measure(url: str, client: str, texts: list[str]) -> dict:
    asyncio.run(CLIENTS[client](url, texts[:128]))  # warm-up: connections, the model's first passes
    started, cpu_started = time.perf_counter(), time.process_time()
    latencies = asyncio.run(CLIENTS[client](url, texts))
    seconds = time.perf_counter() - started
    return {
        "client": client,
        "texts_per_s": len(texts) / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "client_cpu_ms_per_request": 1000 * (time.process_time() - cpu_started) / len(texts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2048)
    parser.add_argument("--clients", default="aiohttp,httpx,lean")
    parser.add_argument("--conditions", default="", help="a note on the machine's load, for the record")
    parser.add_argument("--write", type=Path, help="append the results (markdown) to this file")
    args = parser.parse_args()
    texts = [sentences(1024)[i % 1024] for i in range(args.requests)]
    before = measure_in_process(texts[:1024], repeats=3)
    process, port = start_demo_service(REPO / "bench" / "logs" / "cpu_clients.log")
    try:
        rows = [measure(f"http://127.0.0.1:{port}/embed/text", client, texts) for client in args.clients.split(",")]
    finally:
        stop(process)
    after = measure_in_process(texts[:1024], repeats=3)
    ceiling = max(before["texts_per_s"], after["texts_per_s"])
    result = {"ceiling_texts_per_s": [before["texts_per_s"], after["texts_per_s"]], "rows": rows}
    print(json.dumps(result, indent=1))
    lines = [
        f"### Short captions with ordinary clients, 32 connections ({dt.date.today()})",
        "",
        f"Machine: {machine()}. {args.conditions}".strip(),
        f"Command: `python bench/cpu_clients.py --requests {args.requests}`. Ceiling (sentence-transformers in "
        f"process, before / after): {before['texts_per_s']:.0f} / {after['texts_per_s']:.0f} texts/s.",
        "",
        "| client | texts/s | of ceiling | p50 ms | client CPU ms/request |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        p50 = f"{row['p50_ms']:.0f}" if row["client"] != "lean" else "-"
        lines.append(
            f"| {row['client']} | {row['texts_per_s']:.0f} | {row['texts_per_s'] / ceiling:.2f} | {p50} "
            f"| {row['client_cpu_ms_per_request']:.2f} |"
        )
    print("\n".join(lines))
    append_report(args.write, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
