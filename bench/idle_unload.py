"""Idle unloading on the CPU (runners/idle.py): load time cold and again, unload -> first answer, memory.

    python bench/idle_unload.py
    python bench/idle_unload.py --cycles 5 --write BENCHMARKS.md

The BGE service on the bundled MiniLM weights (`BGE_EMBED_MODEL=demo`):

- in process (torch and transformers imported first, so that neither load counts imports): the runner's first
  load (`cold`: the checkpoint read for the first time in this process) and, over `--cycles` unload/reload cycles,
  each load again, the unload itself, and the first answer after an unload (load + one pass of 8 texts) against
  the same request on the loaded model; the process's RSS loaded and unloaded;
- served (`bentoml serve`, BGE_EMBED_IDLE_UNLOAD_SECONDS=2): the first `POST /embed/texts` after /health says
  unloaded, against the same request on the loaded model, and the RSS of the server's process tree loaded (read
  just after an answer, /health saying loaded before and after) and unloaded.
Medians over the cycles.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# As service.py sets them before torch is imported, so that the in-process passes run as the service's do.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from cpu_serving import append_report, free_port, machine, start, stop  # noqa: E402

TEXTS = [f"an orange cat sleeps in the sun, picture {index}" for index in range(8)]
MIB = 2**20


def tree_rss(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    return sum(process.memory_info().rss for process in [root, *root.children(recursive=True)])


def in_process(cycles: int) -> dict[str, float]:
    import psutil
    import torch  # noqa: F401  - imported before the clock starts
    import transformers  # noqa: F401

    from embed_core.table import SERVICES
    from runners.embedder import TextEmbedder
    from runners.idle import IdleUnloading, hold_runner

    os.environ.update({"BGE_EMBED_MODEL": "demo", "EMBED_DEVICE": "cpu", "BGE_EMBED_IDLE_UNLOAD_SECONDS": "3600"})
    process = psutil.Process()
    started = time.perf_counter()
    holder = hold_runner(SERVICES["bge_embed"], TextEmbedder)
    cold = time.perf_counter() - started
    assert isinstance(holder, IdleUnloading)
    figures: dict[str, list[float]] = {"reload": [], "unload": [], "first": [], "warm": [], "loaded": [], "gone": []}

    async def cycle() -> None:
        await holder.embed(TEXTS)
        started = time.perf_counter()
        await holder.embed(TEXTS)
        figures["warm"].append(time.perf_counter() - started)
        figures["loaded"].append(process.memory_info().rss)
        clock = holder._clock
        holder._clock = lambda: float("inf")  # idle now, without waiting an hour
        started = time.perf_counter()
        assert await holder.unload_if_idle()
        figures["unload"].append(time.perf_counter() - started)
        holder._clock = clock
        figures["gone"].append(process.memory_info().rss)
        started = time.perf_counter()
        await holder.embed(TEXTS)
        figures["first"].append(time.perf_counter() - started)
        figures["reload"].append(holder.last_load_seconds or 0.0)

    for _ in range(cycles):
        asyncio.run(cycle())
    holder.close()
    return {"cold": cold, **{name: statistics.median(values) for name, values in figures.items()}}


def served(cycles: int, logs: Path) -> dict[str, float]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "BGE_EMBED_MODEL": "demo",
        "EMBED_DEVICE": "cpu",
        "BENTOML_DO_NOT_TRACK": "true",
        "BGE_EMBED_IDLE_UNLOAD_SECONDS": "2",
    }
    command = [sys.executable, "-m", "bentoml", "serve", "service:BgeEmbed", "--port", str(port), "--host", "127.0.0.1"]
    logs.mkdir(exist_ok=True)
    process = start(command, env, f"{url}/health", logs / "idle_unload.log")
    figures: dict[str, list[float]] = {"first": [], "warm": [], "loaded": [], "gone": []}
    try:
        with httpx.Client(base_url=url, timeout=300) as client:

            def state() -> dict:
                return client.get("/health").json()

            for _ in range(cycles):
                while True:  # the RSS with the model loaded and warm (not unloaded in between)
                    client.post("/embed/texts", json={"texts": TEXTS}).raise_for_status()
                    started = time.perf_counter()
                    client.post("/embed/texts", json={"texts": TEXTS}).raise_for_status()
                    warm = time.perf_counter() - started
                    before, rss, after = state(), tree_rss(process.pid), state()
                    if (
                        before["model_state"] == after["model_state"] == "loaded"
                        and before["reloads"] == after["reloads"]
                    ):
                        break
                figures["warm"].append(warm)
                figures["loaded"].append(rss)
                while state()["model_state"] != "unloaded":
                    time.sleep(0.1)
                figures["gone"].append(tree_rss(process.pid))
                started = time.perf_counter()
                client.post("/embed/texts", json={"texts": TEXTS}).raise_for_status()
                figures["first"].append(time.perf_counter() - started)
    finally:
        stop(process)
    return {name: statistics.median(values) for name, values in figures.items()}


def markdown(local: dict[str, float], server: dict[str, float], cycles: int, conditions: str) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""### Idle unloading on the CPU, MiniLM (`demo`), {now}

`python bench/idle_unload.py --cycles {cycles}` on {machine()}; {conditions}. Medians of {cycles} unload/reload
cycles; 8 short texts per request.

| | in process | served (`bentoml serve`, HTTP) |
|---|---|---|
| first load (cold, the process's first read of the checkpoint) | {local["cold"]:.2f} s | |
| load again after an unload | {local["reload"]:.2f} s ({local["reload"] / local["cold"]:.2f}× the cold load) | |
| the unload itself (drop, gc, malloc_trim) | {local["unload"] * 1000:.0f} ms | |
| unload → first answer | {local["first"]:.2f} s | {server["first"]:.2f} s |
| the same request, model loaded | {local["warm"] * 1000:.0f} ms | {server["warm"] * 1000:.0f} ms |
| RSS loaded | {local["loaded"] / MIB:.0f} MiB | {server["loaded"] / MIB:.0f} MiB (process tree) |
| RSS unloaded | {freed(local)} | {freed(server)} |
"""


def freed(figures: dict[str, float]) -> str:
    return f"{figures['gone'] / MIB:.0f} MiB (−{(figures['loaded'] - figures['gone']) / MIB:.0f} MiB)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--conditions", default="other work on the machine", help="what else the machine ran")
    parser.add_argument("--write", type=Path, help="append the results (markdown) to this file")
    args = parser.parse_args()
    local = in_process(args.cycles)
    server = served(args.cycles, REPO / "bench" / "logs")
    report = markdown(local, server, args.cycles, args.conditions)
    print(report)
    append_report(args.write, report)


if __name__ == "__main__":
    main()
