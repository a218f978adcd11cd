"""GPU memory figures: what a service needs on a card (measured where a GPU run measured it, else an estimate), a
budget given as a size or a fraction of the card, and whether a set of services fits it. Plain arithmetic, shared by
the services' budget (runners/gpu_budget.py) and the launcher's start-up check (embed_ops/profiles.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 2**30

# Bytes per weight, as in the seed's VRAM table (bf16 2, int8 1, nf4 0.5), and what a process needs on top of its
# weights (the CUDA context, activations of a full batch, the allocator's slack): estimates, until the memory
# benchmark (bench/memory.py) measures a service on a GPU and MEASURED holds its figure.
BYTES_PER_PARAM: dict[str, float] = {"none": 2.0, "int8": 1.0, "bnb-int8": 1.0, "fp8": 1.0, "nf4": 0.5}
OVERHEAD_GB = 1.0
# What a process keeps on the GPU after unloading its model: its CUDA context (an estimate as well). An unloaded
# service's entry keeps this much reserved, so six processes' contexts are counted, not only the loaded models.
CONTEXT_GB = 0.5
ESTIMATE_NOTE = "an estimate (parameters x bytes per parameter, +1 GB for the CUDA context and activations)"


@dataclass(frozen=True)
class Measured:
    gigabytes: float  # 10**9 bytes: the peak the driver saw during a full batch
    card: str
    date: str


# (seed name, quantization) -> the figure bench/memory.py measured on a GPU. Empty: no GPU run yet (BENCHMARKS.md).
MEASURED: dict[tuple[str, str], Measured] = {}


@dataclass(frozen=True)
class Figure:
    seed_name: str
    quantization: str
    gigabytes: float
    source: str  # "measured on <card>, <date>" or ESTIMATE_NOTE

    @property
    def bytes(self) -> int:
        return int(self.gigabytes * 1e9)


def service_figure(seed_name: str, quantization: str, params_billion: float) -> Figure:
    measured = MEASURED.get((seed_name, quantization))
    if measured is not None:
        return Figure(seed_name, quantization, measured.gigabytes, f"measured on {measured.card}, {measured.date}")
    weights = params_billion * BYTES_PER_PARAM.get(quantization, BYTES_PER_PARAM["none"])
    return Figure(seed_name, quantization, weights + OVERHEAD_GB, "estimate")


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|%)?\s*$", re.IGNORECASE)
_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class NoCard(ValueError):
    """A budget given as a fraction of the card, where no card is known."""


def parse_budget(text: str, card_bytes: int | None) -> int:
    """`24GiB`, `24GB`, `24000MiB` (a size), `0.9` or `90%` (of the card: `card_bytes`). Raises ValueError."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"EMBED_GPU_MEMORY={text!r}: not a size (24GiB, 22GB) nor a fraction of the card (0.9, 90%)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if unit in ("", "%"):
        fraction = number / 100 if unit == "%" else number
        if not 0 < fraction <= 1:
            raise ValueError(f"EMBED_GPU_MEMORY={text!r}: a fraction of the card is in (0, 1]")
        if card_bytes is None:
            raise ValueError(
                f"EMBED_GPU_MEMORY={text!r} is a fraction of the card, and no card was found to take it of"
            )
        return int(fraction * card_bytes)
    return int(number * _UNITS[unit.removesuffix("b")])


def least_needed(figures: list[Figure], pinned: set[str]) -> tuple[int, int, int]:
    """(the pinned services' bytes, the largest one that unloads, the CUDA contexts of the others that unload)."""
    always = sum(figure.bytes for figure in figures if figure.seed_name in pinned)
    unloading = [figure.bytes for figure in figures if figure.seed_name not in pinned]
    contexts = max(len(unloading) - 1, 0) * int(CONTEXT_GB * 1e9)
    return always, max(unloading, default=0), contexts


def fits_with_idle_unloaded(figures: list[Figure], pinned: set[str], budget: int) -> bool:
    """Can every service load, with every model that unloads when idle unloaded but the one loading? The pinned
    ones (no idle unloading) are always loaded; the unloaded ones keep their CUDA context."""
    return sum(least_needed(figures, pinned)) <= budget


def describe_figures(figures: list[Figure], pinned: set[str], budget: int, where: str) -> str:
    parts = [
        f"{figure.seed_name} {figure.gigabytes:.1f} GB ({figure.quantization}, "
        f"{'always loaded' if figure.seed_name in pinned else 'unloads when idle'}; {figure.source})"
        for figure in figures
    ]
    always, largest, contexts = least_needed(figures, pinned)
    return (
        f"the GPU memory budget of {where} ({budget / 1e9:.1f} GB) cannot hold these services even with every idle "
        f"model unloaded: the always-loaded ones ({always / 1e9:.1f} GB), the largest one that unloads "
        f"({largest / 1e9:.1f} GB) and the CUDA contexts of the other unloaded ones ({contexts / 1e9:.1f} GB) need "
        f"{(always + largest + contexts) / 1e9:.1f} GB. Per service: {'; '.join(parts)}. "
        "Set <NAME>_IDLE_UNLOAD_SECONDS for more of them, quantize (<NAME>_QUANTIZATION=int8|nf4), pick a lighter "
        "profile, or give a larger --gpu-memory"
    )
