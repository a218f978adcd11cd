"""Memory per service, measured: after the load, at the peak of a full batch, after an idle unload and after the
reload; host RSS always, and on a GPU torch's figures and the driver's (NVML) for the process.

    python bench/memory.py                                  # the demo profile on the CPU (MiniLM), none and int8
    python bench/memory.py --profile demo --write BENCHMARKS.md
    python bench/memory.py --shapes qwen3_8b_embed --layers 4 --out gpu_memory.json   # a GPU, random weights

Each service runs in a child process of its own, as it does when served (`bentoml serve` adds its own ~0.3-0.4 GB
of host memory: bench/idle_unload.py measures a served process tree), held by runners/idle.py's hold_runner with
idle unloading on, so that the unload and the reload are the service's own:

1. load (the int8 weight cache, runners/weight_cache.py, on in a fresh directory: the first load quantizes and
   writes the entry, the reload reads it);
2. a full batch: 64 texts of 250 words, one round of the queue's 16384 tokens (cut to the model's max_length),
   while a thread samples RSS (and NVML) every 10 ms; the figures again once it is answered;
3. the idle unload (the clock moved past IDLE_UNLOAD_SECONDS), then the figures again;
4. one request of 8 short texts, which loads the model again (from the cache for int8): its time, then the figures.

On a GPU: torch.cuda.memory_allocated and max_memory_allocated, memory_reserved, and the process's used memory as
the driver sees it (NVML, nvidia-ml-py; else nvidia-smi), the CUDA context included. `--shapes` builds a
random-weight checkpoint of a service's real shape (Qwen3: `--layers` of its 36 decoder layers, the embeddings
whole) so that a device with no downloaded weights measures the real widths; torch.compile is off (memory, not
speed). Figures: MiB (2**20 bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]
MIB = 2**20
WORDS = ["an", "orange", "cat", "sleeps", "in", "the", "sun", "while", "a", "black", "dog", "runs", "across", "the"]


# -- the child: one service ----------------------------------------------------------------------------------


class Sampler:
    """The highest RSS (and NVML-used memory) seen while a block runs, sampled every 10 ms in a thread."""

    def __init__(self, read: dict[str, Any]) -> None:
        self.read, self.peak = read, {name: 0 for name in read}
        self._stop = threading.Event()

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for name, read in self.read.items():
                self.peak[name] = max(self.peak[name], read())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for name, read in self.read.items():
            self.peak[name] = max(self.peak[name], read())


def nvml_used(pid: int, index: int) -> int | None:
    """Bytes the driver counts for this process on GPU `index` (NVML; nvidia-smi when pynvml is missing)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == pid:
                return int(process.usedGpuMemory or 0)
        return 0
    except Exception:  # no NVML (or no permission to list processes): ask nvidia-smi
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            fields = [field.strip() for field in line.split(",")]
            if len(fields) == 2 and fields[0] == str(pid):
                return int(fields[1]) * MIB
        return 0


def measure_service(seed_name: str) -> dict[str, Any]:
    import psutil
    import torch

    from embed_core.table import SERVICES
    from runners.embedder import TextEmbedder
    from runners.idle import IdleUnloading, hold_runner
    from runners.reranker import Reranker
    from runners.siglip import SiglipEmbedder

    spec = SERVICES[seed_name]
    runner_class = {"text_embedding": TextEmbedder, "rerank": Reranker, "image_embedding": SiglipEmbedder}[spec.kind]
    process = psutil.Process()
    figures: dict[str, Any] = {"service": seed_name}
    started = time.perf_counter()
    holder = hold_runner(spec, runner_class)
    figures["load_s"] = time.perf_counter() - started
    assert isinstance(holder, IdleUnloading)
    device = torch.device(holder.describe()["device"])
    on_gpu = device.type == "cuda"
    index = (device.index or 0) if on_gpu else 0
    figures.update(quantization=holder.config.quantization, device=str(device), model=holder.describe()["model"])

    def snapshot(stage: str) -> None:
        figures[f"{stage}_rss"] = process.memory_info().rss
        if on_gpu:
            torch.cuda.synchronize()
            figures[f"{stage}_allocated"] = torch.cuda.memory_allocated(device)
            figures[f"{stage}_reserved"] = torch.cuda.memory_reserved(device)
            figures[f"{stage}_driver"] = nvml_used(os.getpid(), index)

    full = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(250)) for i in range(64)]
    short = [" ".join(WORDS[i : i + 6]) for i in range(8)]

    async def request(texts: list[str]) -> None:
        if spec.kind == "rerank":
            await holder.score("where is the cat?", texts)
        else:
            await holder.embed(texts)

    async def run() -> None:
        snapshot("loaded")
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        readers: dict[str, Any] = {"rss": lambda: process.memory_info().rss}
        if on_gpu:
            readers["driver"] = lambda: nvml_used(os.getpid(), index) or 0
        with Sampler(readers) as sampler:
            await request(full)
        snapshot("batched")
        figures["batch_peak_rss"] = sampler.peak["rss"]
        if on_gpu:
            figures["batch_peak_allocated"] = torch.cuda.max_memory_allocated(device)
            figures["batch_peak_driver"] = sampler.peak["driver"]
        clock = holder._clock
        holder._clock = lambda: float("inf")  # idle now, without waiting IDLE_UNLOAD_SECONDS
        assert await holder.unload_if_idle()
        holder._clock = clock
        snapshot("unloaded")
        started = time.perf_counter()
        await request(short)
        figures["reload_answer_s"] = time.perf_counter() - started
        figures["reload_s"] = holder.last_load_seconds
        snapshot("reloaded")

    asyncio.run(run())
    holder.close()
    return figures


def shaped_checkpoint(seed_name: str, layers: int, directory: Path, smoke: bool = False) -> Path:
    """A random-weight checkpoint of the service's real widths (`layers` decoder layers) with a Qwen tokenizer."""
    import torch
    from gpu_throughput import QWEN3_4B, QWEN3_8B, TINY
    from transformers import Qwen3Config, Qwen3Model

    from tests.conftest import build_qwen_tokenizer

    shapes = {"qwen3_8b_embed": QWEN3_8B, "qwen3_4b_embed": QWEN3_4B}
    if seed_name not in shapes:
        raise SystemExit(f"--shapes knows {', '.join(shapes)}")
    shape = TINY if smoke else shapes[seed_name]
    build_qwen_tokenizer(directory, appends_end_of_text=seed_name == "qwen3_8b_embed")
    torch.manual_seed(0)
    config = Qwen3Config(**{**shape, "num_hidden_layers": layers}, tie_word_embeddings=False)
    model = Qwen3Model(config).to(torch.bfloat16)  # 4 layers of the 8B shape: 1.4 B parameters, 5.6 GB in fp32
    model.save_pretrained(str(directory))
    return directory


def child(args: argparse.Namespace) -> None:
    print(json.dumps(measure_service(args.child)), flush=True)


# -- the parent: one child per service -----------------------------------------------------------------------


def run_child(seed_name: str, env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, __file__, "--child", seed_name], cwd=REPO, env={**os.environ, **env},
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"{seed_name}: the child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def service_env(prefix: str, mode: str, scratch: Path) -> dict[str, str]:
    """The mode, idle unloading on (the bench unloads by moving the clock), and a fresh weight cache."""
    return {
        f"{prefix}_QUANTIZATION": mode,
        f"{prefix}_IDLE_UNLOAD_SECONDS": "3600",
        f"{prefix}_WEIGHT_CACHE": str(scratch / f"cache-{prefix}-{mode}"),
    }


def runs(args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    from embed_ops.profiles import profile_env, profile_for

    common = {"EMBED_COMPILE": "0", "EMBED_LOG_LEVEL": "WARNING"}
    found = []
    if args.shapes:
        for seed_name in args.shapes:
            directory = shaped_checkpoint(seed_name, args.layers, scratch / seed_name, args.smoke)
            prefix = seed_name.upper()
            for mode in args.modes:
                env = {**common, **service_env(prefix, mode, scratch), f"{prefix}_MODEL": str(directory)}
                found.append({**run_child(seed_name, env), "layers": args.layers})
                print(json.dumps(found[-1]), flush=True)
        return found
    profile = profile_for(args.profile)
    for seed_name in profile.services:
        prefix = seed_name.upper()
        for mode in args.modes:
            env = {**common, **profile_env(profile, os.environ), **service_env(prefix, mode, scratch)}
            found.append({**run_child(seed_name, env), "profile": profile.name})
            print(json.dumps(found[-1]), flush=True)
    return found


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def markdown(found: list[dict[str, Any]], command: str, conditions: str) -> str:
    from cpu_serving import machine

    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    gpu = any(row["device"].startswith("cuda") for row in found)
    lines = [
        f"### Memory per service{' on a GPU' if gpu else ' on the CPU'}, {now}",
        "",
        f"`{command}` on {machine()}; {conditions}. One child process per row; MiB.",
        "",
        "| service | mode | first load | RSS loaded | RSS batch peak | RSS after the batch | RSS unloaded | "
        "RSS reloaded | reload | unload → answer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in found:
        model = Path(row["model"])
        freed = row["batched_rss"] - row["unloaded_rss"]
        cells = [
            f"{row['service']} ({model.parent.name if model.name == 'model' else model.name})",
            row["quantization"],
            f"{row['load_s']:.2f} s",
            *(mib(row[key]) for key in ("loaded_rss", "batch_peak_rss", "batched_rss")),
            f"{mib(row['unloaded_rss'])} (−{mib(freed)})",
            mib(row["reloaded_rss"]),
            f"{row['reload_s']:.2f} s ({row['reload_s'] / row['load_s']:.2f}×)",
            f"{row['reload_answer_s']:.2f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if gpu:
        lines += [
            "",
            "| service | mode | allocated loaded | peak allocated (batch) | driver loaded | driver batch peak | "
            "driver after the batch | driver unloaded | driver reloaded |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in found:
            lines.append(
                f"| {row['service']} | {row['quantization']} | {mib(row['loaded_allocated'])} | "
                f"{mib(row['batch_peak_allocated'])} | {mib(row['loaded_driver'])} | {mib(row['batch_peak_driver'])} | "
                f"{mib(row['batched_driver'])} | {mib(row['unloaded_driver'])} | {mib(row['reloaded_driver'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--modes", nargs="+", default=["none", "int8"])
    parser.add_argument("--shapes", nargs="*", help="random-weight checkpoints of these services' real shapes")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of a --shapes checkpoint")
    parser.add_argument("--smoke", action="store_true", help="(gpu_session.sh --smoke) the tiny shape, 1 layer")
    parser.add_argument("--out", type=Path, help="the rows as JSON")
    parser.add_argument("--conditions", default="other work on the machine")
    parser.add_argument("--write", type=Path, help="append the results (markdown) to this file")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.smoke:
        args.layers = 1
    with tempfile.TemporaryDirectory() as scratch:
        found = runs(args, Path(scratch))
    report = markdown(found, "python bench/memory.py " + " ".join(sys.argv[1:]), args.conditions)
    print(report)
    if args.out:
        args.out.write_text(json.dumps(found, indent=1))
    if args.write:
        with args.write.open("a", encoding="utf-8") as out:
            out.write("\n" + report)


if __name__ == "__main__":
    main()
