"""Settings read from the environment, with the service table's defaults.

Every knob is `<SEED NAME>_<KEY>` for one service (e.g. QWEN3_8B_EMBED_QUANTIZATION), falling
back to `EMBED_<KEY>` for all services, then to the default given here or in the table.
Numbers are read by one helper, env_number, for the services, the supervisor and the HTTP layer alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import ModelLoadError
from .table import POOLING_NAMES, QUANTIZATIONS, ServiceSpec

# QUANTIZATIONS (embed_core/table.py): int8 is weight-only int8 (runners/int8.py); bnb-int8 bitsandbytes'
# LLM.int8(); nf4 bitsandbytes 4-bit; fp8 FP8 weights and activations (runners/fp8.py). README.md compares them.


Number = TypeVar("Number", int, float)

# Parts of a hub repository no service reads (other formats, the diffusion parts of a pipeline): the loader and
# embed_ops.download both skip them.
HUB_IGNORE = ("*.onnx", "onnx/*", "openvino/*", "*.msgpack", "*.h5", "*.ot", "transformer/*", "vae/*", "*.gguf")


class SettingError(ValueError):
    """A setting that is not a number, or below its minimum; the message names the variable."""


def env_number(
    raw: str | None,
    name: str,
    default: Number,
    *,
    parse: type[Number],
    minimum: Number | None = None,
    above: Number | None = None,
) -> Number:
    """`raw` (an environment variable's value, None or blank for unset) as a number of type `parse`: at least
    `minimum`, or more than `above`. `name` is what the message calls it (e.g. `EMBED_READ_TIMEOUT`)."""
    raw = (raw or "").strip()
    if not raw:
        return default
    kind = "an integer" if parse is int else "a number"
    try:
        value = parse(raw)
    except ValueError:
        raise SettingError(f"{name} must be {kind}, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise SettingError(f"{name} must be >= {minimum:g}, got {raw}")
    if above is not None and not value > above:
        raise SettingError(f"{name} must be {kind} > {above:g}, got {raw!r}")
    return value


def environ_number(
    env: Mapping[str, str], name: str, default: Number, *, parse: type[Number], **bounds: Number
) -> Number:
    """env_number for the variable `name` of `env` (os.environ or a process's own environment)."""
    return env_number(env.get(name), name, default, parse=parse, **bounds)


def setting(spec: ServiceSpec, key: str, default: str | None = None) -> str | None:
    for name in (f"{spec.env_prefix}_{key}", f"EMBED_{key}"):
        value = os.environ.get(name)
        if value is not None and value.strip() != "":
            return value.strip()
    return default


def int_setting(spec: ServiceSpec, key: str, default: int, minimum: int = 1) -> int:
    name = f"{spec.env_prefix}_{key} (or EMBED_{key})"
    try:
        return env_number(setting(spec, key), name, default, parse=int, minimum=minimum)
    except SettingError as exc:
        raise ModelLoadError(str(exc)) from None


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
