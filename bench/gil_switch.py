"""The model's forward pass next to a busy event loop, at Python's default GIL switch interval and shorter ones.

    python bench/gil_switch.py
    python bench/gil_switch.py --write BENCHMARKS.md

A service runs the model in one thread and HTTP in the event loop's. The model's thread lets go of the GIL
at every torch operation and must get it back; while the other thread runs Python without pause, each time
it waits until that thread is told to give it up, after the switch interval (`sys.setswitchinterval`,
5 ms by default). In process: the BGE runner (`TextEmbedder`) on the bundled MiniLM weights embeds 32 short
captions per pass (what 32 concurrent searches make), alone and next to a thread doing an event loop's kind
of work without pause (JSON bodies parsed and written); the median of `--passes` passes at each interval.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from cpu_serving import append_report, machine, sentences  # noqa: E402

INTERVALS = (0.005, 0.001, 0.0005)


def median_ms(work, passes: int) -> float:
    timings = []
    for _ in range(passes):
        started = time.perf_counter()
        work()
        timings.append(time.perf_counter() - started)
    return 1000 * statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=9)
    parser.add_argument("--write", type=Path, help="append the results (markdown) to this file")
    args = parser.parse_args()

    from embed_core.config import RunnerConfig
    from embed_core.table import SERVICES
    from runners.embedder import TextEmbedder

    spec = SERVICES["bge_embed"]
    os.environ.update({spec.model_env: "demo", "EMBED_DEVICE": "cpu", "EMBED_QUANTIZATION": "none"})
    embedder = TextEmbedder(spec, RunnerConfig.from_env(spec))
    captions = sentences(32, seed=3)
    work = functools.partial(embedder._embed_batch, captions)
    work()
    body = json.dumps({"input": captions[:1], "model": "bge_embed"})
    answer = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1] * 384}]}
    busy = threading.Event()

    def event_loop_like() -> None:
        while busy.is_set():
            json.loads(body)
            json.dumps(answer)

    default = sys.getswitchinterval()
    rows = []
    try:
        for interval in INTERVALS:
            sys.setswitchinterval(interval)
            alone = median_ms(work, args.passes)
            busy.set()
            other = threading.Thread(target=event_loop_like)
            other.start()
            try:
                beside = median_ms(work, args.passes)
            finally:
                busy.clear()
                other.join()
            rows.append({"interval_ms": 1000 * interval, "alone_ms": alone, "beside_ms": beside})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        sys.setswitchinterval(default)
        embedder.close()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### The model's pass next to a busy event loop, by GIL switch interval ({date})",
        "",
        f"Machine: {machine()}. Command: `python bench/gil_switch.py --passes {args.passes}` (the BGE runner on the "
        "bundled MiniLM weights, 32 captions per pass; the median pass).",
        "",
        "| switch interval | pass alone, ms | pass next to a thread running Python without pause, ms | × alone |",
        "|---|---|---|---|",
        *(
            f"| {row['interval_ms']:g} ms | {row['alone_ms']:.1f} | {row['beside_ms']:.1f} "
            f"| {row['beside_ms'] / row['alone_ms']:.2f} |"
            for row in rows
        ),
    ]
    print("\n".join(lines))
    append_report(args.write, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
