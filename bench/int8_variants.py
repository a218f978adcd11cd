"""Which int8 weight scheme is accurate enough: MiniLM's cosine to fp32 with each variant, on the CPU.

    python bench/int8_variants.py [--texts 300]
    python bench/int8_variants.py --speed [--rounds 5] [--dtype float32]

Each variant replaces every nn.Linear weight of the unquantized fp32 runner (the real all-MiniLM-L6-v2
weights, `BGE_EMBED_MODEL=demo`) by its int8-rounded value in place, so only the rounding differs, never
the product. Two text sets: bench/quant_accuracy.py's (fixed texts and random strings of 1 to 80 words)
and SHORT, one- and two-word texts, where the error is largest (a short text averages few tokens).
Variants: one scale per output channel (absmax, or the clip ratio of least squared error per row),
per-group scales of 32/64/128 input columns (not a single fused product), the column factors of
runners/int8.py after 1-16 balancing rounds, and per-channel int8 with one kind of layer left fp32.

--speed: what the column scales cost. One process, MiniLM on 256 texts, the runs interleaved round by round
(the best of each kept): unquantized, int8 as in runners/int8.py, and int8 through the products of one
scale per channel only (the arithmetic before the column scales, wrong vectors, the same work otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from quant_accuracy import sentences, set_env  # noqa: E402

import runners.int8 as int8  # noqa: E402
from embed_core.config import RunnerConfig  # noqa: E402
from embed_core.table import SERVICES  # noqa: E402
from runners.embedder import TextEmbedder  # noqa: E402

WORDS = ["hi", "thanks", "maybe", "true", "false", "OK", "Yes", "No", "okay", "sure", "why", "what", "who",
    "the", "a", "an", "of", "1", "2", "42", "?", "!", ".", "hello!", "bye", "cool", "nice", "good", "bad",
    "up", "down", "left", "right", "stop", "go", "run", "eat", "sleep", "love", "hate", "red", "cat", "dog",
    "car", "你好", "谢谢", "是", "不", "好的", "ja", "nein", "oui", "merci", "gracias", "hola", "🙂", ":)", "lol",
    "wow", "hmm", "um", "yes.", "no.", "ok!", "N/A", "test", "foo", "bar", "x", "y", "z"]  # fmt: skip
SHORT = WORDS + [f"{a} {b}" for a, b in zip(WORDS, WORDS[1:], strict=False)]
Rounding = Callable[[torch.Tensor], torch.Tensor]  # weight -> its int8-rounded value, in float


def per_channel(w: torch.Tensor, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True) * clip / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


def least_squares_clip(w: torch.Tensor) -> torch.Tensor:
    """Per row, the clip ratio in [0.5, 1] whose rounding is closest to the row (squared error)."""
    best = per_channel(w)
    for ratio in torch.linspace(0.5, 1.0, 51).tolist():
        candidate = per_channel(w, ratio)
        closer = (w - candidate).pow(2).sum(1, keepdim=True) < (w - best).pow(2).sum(1, keepdim=True)
        best = torch.where(closer, candidate, best)
    return best


def groups(size: int) -> Rounding:
    return lambda w: per_channel(w.reshape(-1, size)).reshape(w.shape)


def balanced(rounds: int) -> Rounding:
    def rounding(w: torch.Tensor) -> torch.Tensor:
        columns = int8.column_scales(w, rounds)
        return per_channel(w / columns) * columns

    return rounding


KINDS = {
    "attention q/k/v": lambda name: name.rsplit(".", 1)[-1] in ("query", "key", "value"),
    "attention output": lambda name: "attention.output" in name,
    "FFN input": lambda name: "intermediate" in name,
    "FFN output": lambda name: name.endswith("output.dense") and "attention" not in name,
}


def runner_for(quantization: str, dtype: str = "float32") -> TextEmbedder:
    spec = SERVICES["bge_embed"]
    set_env(spec, "demo", quantization)
    os.environ["EMBED_DTYPE"] = dtype
    return TextEmbedder(spec, RunnerConfig.from_env(spec))


def per_channel_products() -> tuple[Callable, Callable]:
    def dequantizing(rows: torch.Tensor, weight: int8.Int8Weight) -> torch.Tensor:
        return F.linear(rows, weight.data.to(rows.dtype)) * weight.scale.to(rows.dtype)

    def fused(rows: torch.Tensor, weight: int8.Int8Weight) -> torch.Tensor:
        return torch._weight_int8pack_mm(rows.contiguous(), weight.data, weight.scale.to(rows.dtype))

    return dequantizing, fused


def speed(rounds: int, dtype: str) -> None:
    texts = sentences(256, seed=1)
    full, quantized = runner_for("none", dtype), runner_for("int8", dtype)
    committed = (int8.dequantizing_product, int8.fused_cpu_product)
    variants = {f"unquantized {dtype}": (full, committed), "int8 (runners/int8.py)": (quantized, committed),
                "int8, products of one scale per channel": (quantized, per_channel_products())}  # fmt: skip
    for runner in (full, quantized):
        asyncio.run(runner.embed(texts[:32]))  # warm-up
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for label, (runner, products) in variants.items():
            int8.dequantizing_product, int8.fused_cpu_product = products  # int8_linear looks them up per call
            start = time.perf_counter()
            asyncio.run(runner.embed(texts))
            best[label] = min(best[label], time.perf_counter() - start)
    int8.dequantizing_product, int8.fused_cpu_product = committed
    for label, seconds in best.items():
        print(f"| {label} | {seconds:.2f} | {seconds / best[f'unquantized {dtype}']:.2f} |", flush=True)


def main() -> None:
    logging.getLogger("runners").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if args.speed:
        return speed(args.rounds, args.dtype)
    runner = runner_for("none")
    texts = sentences(args.texts)
    everything = texts + SHORT
    linears = {name: m for name, m in runner.model.named_modules() if type(m) is torch.nn.Linear}
    original = {name: m.weight.detach().clone() for name, m in linears.items()}
    full = torch.tensor(asyncio.run(runner.embed(everything)))

    def measure(label: str, rounding: Rounding, keep: Callable[[str], bool] = lambda name: False) -> None:
        with torch.no_grad():
            for name, linear in linears.items():
                linear.weight.copy_(original[name] if keep(name) else rounding(original[name]))
        cosine = F.cosine_similarity(torch.tensor(asyncio.run(runner.embed(everything))), full)
        bench, short = cosine[: len(texts)], cosine[len(texts) :]
        print(f"| {label} | {bench.min():.5f} | {bench.mean():.6f} | {short.min():.5f} | {short.mean():.6f} | "
              f"{SHORT[int(short.argmin())]!r} |", flush=True)  # fmt: skip

    print(f"| variant | {len(texts)} texts: min | mean | {len(SHORT)} short texts: min | mean | worst short |")
    print("|---|---|---|---|---|---|")
    measure("per channel, absmax (before)", per_channel)
    measure("per channel, least-squares clip per row", least_squares_clip)
    for size in (32, 64, 128):
        measure(f"groups of {size} input columns", groups(size))
    for rounds in (1, 2, 4, 16):
        measure(f"column factors, {rounds} balancing round(s)", balanced(rounds))
    for kind, keep in KINDS.items():
        measure(f"per channel, {kind} left fp32", per_channel, keep)
    runner.close()


if __name__ == "__main__":
    main()
