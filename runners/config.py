"""Settings read from the environment, with the service table's defaults.

Every knob is `<SEED NAME>_<KEY>` for one service (e.g. QWEN3_8B_EMBED_QUANTIZATION), falling
back to `EMBED_<KEY>` for all services, then to the default given here or in the table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import ModelLoadError
from .table import POOLING_NAMES, QUANTIZATIONS, ServiceSpec

# QUANTIZATIONS (runners/table.py): int8 is weight-only int8 (runners/int8.py); bnb-int8 bitsandbytes'
# LLM.int8(); nf4 bitsandbytes 4-bit; fp8 FP8 weights and activations (runners/fp8.py). README.md compares them.


def setting(spec: ServiceSpec, key: str, default: str | None = None) -> str | None:
    for name in (f"{spec.env_prefix}_{key}", f"EMBED_{key}"):
        value = os.environ.get(name)
        if value is not None and value.strip() != "":
            return value.strip()
    return default


def int_setting(spec: ServiceSpec, key: str, default: int, minimum: int = 1) -> int:
    raw = setting(spec, key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ModelLoadError(f"{spec.env_prefix}_{key} (or EMBED_{key}) must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ModelLoadError(f"{spec.env_prefix}_{key} (or EMBED_{key}) must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class RunnerConfig:
    """What a runner needs to know, resolved once at start-up."""

    model: str
    model_env: str
    quantization: str
    device: str  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str  # "auto" | "bfloat16" | "float16" | "float32"
    max_length: int | None  # None: the model's own limit
    max_items_per_request: int
    max_batch_tokens: int  # padded tokens in one forward pass
    max_batch_items: int  # texts taken from the queue for one round
    max_queued_items: int  # more waiting than this: new requests get a 503 at once
    pooling: str | None  # override of the model's own pooling: one of POOLING_NAMES
    packed: bool = True  # padding-free forward for architectures that have one (EMBED_PACKED=0 turns it off)
    compile: str = "auto"  # torch.compile the packed layers: auto (on GPUs) | 1 | 0
    idle_unload_seconds: int = 0  # unload the model after this long without a request (runners/idle.py); 0: never
    load_wait_seconds: int = 300  # a request waits this long for a model loading again, then gets a 503
    weight_cache: str = ""  # where quantized weights are kept (runners/weight_cache.py): a directory, "off", "" default
    gpu_memory: str = ""  # EMBED_GPU_MEMORY: the GPU memory budget the services share (runners/gpu_budget.py)

    def compiles_on(self, device: Any) -> bool:
        """EMBED_COMPILE: 1 always, 0 never, auto on GPUs only (compiling costs start-up time; the fused
        kernels pay off on a GPU)."""
        return self.compile in ("1", "true", "yes", "on") or (self.compile == "auto" and device.type == "cuda")

    @classmethod
    def from_env(cls, spec: ServiceSpec) -> RunnerConfig:
        quantization = (setting(spec, "QUANTIZATION", spec.default_quantization) or "none").lower()
        if quantization not in QUANTIZATIONS:
            raise ModelLoadError(f"{spec.quantization_env}={quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
        pooling = setting(spec, "POOLING")
        if pooling is not None and pooling not in POOLING_NAMES:
            raise ModelLoadError(f"{spec.env_prefix}_POOLING={pooling!r} is not one of {', '.join(POOLING_NAMES)}")
        max_length = setting(spec, "MAX_LENGTH")
        return cls(
            model=os.environ.get(spec.model_env, "").strip() or spec.default_model,
            model_env=spec.model_env,
            quantization=quantization,
            device=(setting(spec, "DEVICE", "auto") or "auto").lower(),
            dtype=(setting(spec, "DTYPE", "auto") or "auto").lower(),
            max_length=int_setting(spec, "MAX_LENGTH", 0) if max_length else None,
            max_items_per_request=int_setting(spec, "MAX_ITEMS_PER_REQUEST", 256),
            max_batch_tokens=int_setting(spec, "MAX_BATCH_TOKENS", 16384, minimum=64),
            max_batch_items=int_setting(spec, "MAX_BATCH_ITEMS", 1024),
            max_queued_items=int_setting(spec, "MAX_QUEUED_ITEMS", 8192),
            pooling=pooling,
            packed=(setting(spec, "PACKED", "1") or "1").lower() not in ("0", "false", "no", "off"),
            compile=(setting(spec, "COMPILE", "auto") or "auto").lower(),
            idle_unload_seconds=int_setting(spec, "IDLE_UNLOAD_SECONDS", 0, minimum=0),
            load_wait_seconds=int_setting(spec, "LOAD_WAIT_SECONDS", 300),
            weight_cache=setting(spec, "WEIGHT_CACHE", "") or "",
            gpu_memory=setting(spec, "GPU_MEMORY", "") or "",
        )
