"""Start-up profiles (which services run together) and their GPU-memory estimate, as data.

The profiles follow the seed's "24GB 显存推荐配置" table. SigLIP2 is in every GPU profile: an
image-management system always needs its image embeddings, and it costs ~2.3 GB.
`start_embed_server.sh` reads everything from here through `python -m embed_ops.launcher`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from embed_core.config import QUANTIZATIONS, setting
from embed_core.memory import (
    BYTES_PER_PARAM,
    Figure,
    NoCard,
    describe_figures,
    fits_with_idle_unloaded,
    parse_budget,
)
from embed_core.memory import ESTIMATE_NOTE as BUDGET_ESTIMATE_NOTE
from embed_core.memory import service_figure as budget_figure
from embed_core.table import SERVICES, ServiceSpec, spec_for

from .sharing import runs_on_another_model

# BYTES_PER_PARAM (runners/gpu_budget.py): bytes per weight, as in the seed's VRAM table (FP16 ~2 bytes, INT8 ~1
# byte per parameter). An estimate: the quantized modes keep the embeddings and norms in bf16, and activations and
# the CUDA context come on top; bench/memory.py measures them on a GPU (BENCHMARKS.md: not yet measured).
ESTIMATE_NOTE = "an estimate (parameters x bytes per parameter), not yet measured on a GPU"
assert set(BYTES_PER_PARAM) == set(QUANTIZATIONS)


@dataclass(frozen=True)
class Profile:
    name: str
    services: tuple[str, ...]
    description: str
    # Quantization a profile asks for; the user's <NAME>_QUANTIZATION / EMBED_QUANTIZATION still wins.
    quantization: Mapping[str, str] = field(default_factory=dict)
    # Settings a profile forces (the demo profile's bundled weights on CPU).
    env: Mapping[str, str] = field(default_factory=dict)
    uses_gpu: bool = True
    # Checkpoints a profile runs instead of the table's (hub ids, downloaded by `embed_ops.download --profile`);
    # the user's <NAME>_MODEL still wins.
    models: Mapping[str, str] = field(default_factory=dict)
    # <NAME>_IDLE_UNLOAD_SECONDS for each of its services (0: the service's own default, off), and the GPU memory
    # budget (EMBED_GPU_MEMORY: runners/gpu_budget.py) the profile runs under unless --gpu-memory gives one.
    idle_unload_seconds: int = 0
    gpu_memory: str = ""


PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile(
            "high",
            ("siglip2_embed", "qwen3_8b_embed", "qwen3_8b_rerank"),
            "高精度: SigLIP2 + Qwen3-Embedding-8B (int8) + Qwen3-Reranker-8B (int8)",
            quantization={"qwen3_8b_embed": "int8", "qwen3_8b_rerank": "int8"},
        ),
        Profile(
            "balanced",
            ("siglip2_embed", "qwen3_8b_embed", "qwen3_4b_rerank"),
            "平衡: SigLIP2 + Qwen3-Embedding-8B (int8) + Qwen3-4B reranker (int8, the seed's ~4 GB)",
            quantization={"qwen3_8b_embed": "int8", "qwen3_4b_rerank": "int8"},
        ),
        Profile(
            "light",
            ("siglip2_embed", "qwen3_4b_embed", "qwen3_4b_rerank"),
            "轻量: SigLIP2 + Qwen3-4B embeddings + Qwen3-4B reranker (both on Z-Image-Turbo's text encoder)",
        ),
        Profile(
            "all",
            tuple(SERVICES),
            "all six services, with the table's quantization; each unloads after 5 idle minutes, and within 90% of "
            "the card the least recently used idle one unloads when another must load",
            idle_unload_seconds=300,
            gpu_memory="0.9",
        ),
        Profile(
            "demo",
            ("bge_embed",),
            "the BGE service on the bundled all-MiniLM-L6-v2 weights, on CPU: no GPU, no download",
            env={"BGE_EMBED_MODEL": "demo", "BGE_EMBED_DEVICE": "cpu"},
            uses_gpu=False,
        ),
        Profile(
            "photos-cpu",
            ("siglip2_embed",),
            "SigLIP2 base/16 @224 on CPU: index and search your photos without a GPU (download it once)",
            env={"SIGLIP2_EMBED_DEVICE": "cpu"},
            uses_gpu=False,
            models={"siglip2_embed": "google/siglip2-base-patch16-224"},
        ),
    )
}
DEFAULT_PROFILE = "high"


def profile_for(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None


def profile_env(profile: Profile | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to export for a profile: its forced settings, and its models and quantization where the
    user set none."""
    if profile is None:
        return {}
    env = dict(profile.env)
    for seed_name, model in profile.models.items():
        if not environ.get(spec_for(seed_name).model_env, "").strip():
            env[spec_for(seed_name).model_env] = model
    for seed_name, quantization in profile.quantization.items():
        spec = spec_for(seed_name)
        if not environ.get(spec.quantization_env, "").strip() and not environ.get("EMBED_QUANTIZATION", "").strip():
            env[spec.quantization_env] = quantization
    if profile.idle_unload_seconds and not environ.get("EMBED_IDLE_UNLOAD_SECONDS", "").strip():
        for seed_name in profile.services:
            name = f"{spec_for(seed_name).env_prefix}_IDLE_UNLOAD_SECONDS"
            if not environ.get(name, "").strip():
                env[name] = str(profile.idle_unload_seconds)
    return env


def service_port(spec: ServiceSpec, environ: Mapping[str, str] | None = None) -> int:
    """The table's port, unless `<NAME>_PORT` moves it (no EMBED_PORT: six services cannot share one)."""
    raw = (environ if environ is not None else os.environ).get(f"{spec.env_prefix}_PORT", "").strip()
    if not raw:
        return spec.port
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{spec.env_prefix}_PORT={raw!r} is not a port number")
    return int(raw)


# -- GPU memory -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightEstimate:
    seed_name: str
    quantization: str
    device: str  # "cpu", or the GPU index as a string
    gigabytes: float  # 10**9 bytes, as the seed counts


def estimate_weights(seed_names: list[str]) -> list[WeightEstimate]:
    """Weights in memory for each service, by the quantization and device the environment gives it
    (activations and the CUDA context come on top)."""
    estimates = []
    for seed_name in seed_names:
        spec = spec_for(seed_name)
        quantization = (setting(spec, "QUANTIZATION", spec.default_quantization) or "none").lower()
        device = (setting(spec, "DEVICE", "auto") or "auto").lower()
        gigabytes = spec.params_billion * BYTES_PER_PARAM.get(quantization, BYTES_PER_PARAM["none"])
        if runs_on_another_model(spec):
            gigabytes = 0.0
        estimates.append(WeightEstimate(seed_name, quantization, _gpu_index(device), gigabytes))
    return estimates


def _gpu_index(device: str) -> str:
    if device in ("auto", "cuda"):
        return "0"  # where torch puts an unindexed "cuda" (and "auto" on a GPU box)
    if device.startswith("cuda:"):
        return device.removeprefix("cuda:")
    return "cpu"


def per_gpu(estimates: list[WeightEstimate]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for estimate in estimates:
        if estimate.device != "cpu":
            totals[estimate.device] = totals.get(estimate.device, 0.0) + estimate.gigabytes
    return totals


def memory_warnings(totals: dict[str, float], free_bytes: dict[str, int]) -> list[str]:
    """One warning per GPU whose estimated weights exceed its free memory; GPUs we know nothing of are skipped."""
    warnings = []
    for index, needed in sorted(totals.items()):
        free = free_bytes.get(index)
        if free is not None and needed * 1e9 > free:
            warnings.append(
                f"GPU {index}: the weights alone need ~{needed:.1f} GB ({ESTIMATE_NOTE}), but only "
                f"{free / 1e9:.1f} GB is free. "
                "Pick a lighter profile, quantize (<NAME>_QUANTIZATION=int8|nf4), or move a service "
                "with <NAME>_DEVICE=cuda:N."
            )
    return warnings


def free_gpu_memory() -> dict[str, int]:
    """Free bytes per GPU index as torch numbers them; {} when no GPU (or no way to ask) is found."""
    free = _from_nvidia_smi(os.environ)
    return free if free is not None else _from_torch(lambda index: _torch().cuda.mem_get_info(index)[0])


def total_gpu_memory() -> dict[str, int]:
    """Each GPU's memory in bytes (what a budget given as a fraction of the card is taken of)."""
    total = _from_nvidia_smi(os.environ, "memory.total")
    return total if total is not None else _from_torch(lambda index: _torch().cuda.mem_get_info(index)[1])


def _from_nvidia_smi(environ: Mapping[str, str], field: str = "memory.free") -> dict[str, int] | None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu=index,{field}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    physical: dict[str, int] = {}
    for line in out.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            physical[parts[0]] = int(parts[1]) * 1024 * 1024  # MiB
    # nvidia-smi numbers GPUs physically; torch renumbers the ones CUDA_VISIBLE_DEVICES lists.
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical
    ids = [item.strip() for item in visible.split(",") if item.strip()]
    if not all(item.isdigit() for item in ids):
        return None  # UUIDs: let torch answer
    return {str(logical): physical[item] for logical, item in enumerate(ids) if item in physical}


def _torch():  # noqa: ANN202 - the module, imported only when asked
    import torch

    return torch


def _from_torch(per_index: Callable[[int], int]) -> dict[str, int]:
    try:
        torch = _torch()
        if not torch.cuda.is_available():
            return {}
        return {str(index): per_index(index) for index in range(torch.cuda.device_count())}
    except Exception:  # no torch, a broken driver: no estimate to compare with, and no reason to stop
        return {}


def describe_estimate(estimates: list[WeightEstimate]) -> list[str]:
    lines = []
    for index, total in sorted(per_gpu(estimates).items()):
        parts = ", ".join(f"{e.seed_name} {e.gigabytes:.1f} ({e.quantization})" for e in estimates if e.device == index)
        lines.append(f"GPU {index}: ~{total:.1f} GB of weights: {parts}; {ESTIMATE_NOTE}")
    return lines


# -- the GPU memory budget (runners/gpu_budget.py) ------------------------------------------------------


def budget_figures(seed_names: list[str]) -> dict[str, list[Figure]]:
    """Each GPU's services with their budget figure (measured, else estimated), by the environment's settings."""
    by_gpu: dict[str, list[Figure]] = {}
    for estimate in estimate_weights(seed_names):
        spec = spec_for(estimate.seed_name)
        if estimate.device != "cpu" and not runs_on_another_model(spec):
            figure = budget_figure(spec.seed_name, estimate.quantization, spec.params_billion)
            by_gpu.setdefault(estimate.device, []).append(figure)
    return by_gpu


def pinned_services(seed_names: list[str]) -> set[str]:
    """The services that never unload (no <NAME>_IDLE_UNLOAD_SECONDS): always loaded, never asked to make room."""
    return {name for name in seed_names if (setting(spec_for(name), "IDLE_UNLOAD_SECONDS", "0") or "0") in ("0", "")}


def check_budget(seed_names: list[str], gpu_memory: str, card_bytes: dict[str, int]) -> tuple[list[str], list[str]]:
    """(notes, refusals) for these services under the budget: a refusal per GPU whose budget cannot hold them even
    with every idle model unloaded, with the figures; a note where the budget cannot be checked here."""
    notes, refusals = [], []
    pinned = pinned_services(seed_names)
    for index, figures in sorted(budget_figures(seed_names).items()):
        try:
            budget = parse_budget(gpu_memory, card_bytes.get(index))
        except NoCard:
            notes.append(f"GPU {index}: no card found here to take {gpu_memory} of; the services check it as they load")
            continue
        if not fits_with_idle_unloaded(figures, pinned, budget):
            refusals.append(describe_figures(figures, pinned, budget, f"GPU {index}"))
            continue
        held = ", ".join(
            f"{f.seed_name} {f.gigabytes:.1f} GB ({'always loaded' if f.seed_name in pinned else 'unloads when idle'})"
            for f in figures
        )
        source = "measured" if all(f.source != "estimate" for f in figures) else BUDGET_ESTIMATE_NOTE
        notes.append(f"GPU {index}: budget {budget / 1e9:.1f} GB; {held}; figures: {source}")
    return notes, refusals
