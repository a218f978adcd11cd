"""Quantized weights kept on disk (`int8`, runners/int8.py), so that a load after the first reads the quantized
model (1 byte a weight) instead of reading the checkpoint (2-4 bytes a weight) and quantizing it again.

One safetensors file per entry, keyed by the checkpoint's directory, the quantization mode and its recipe, the
dtype and the model class; its metadata holds what the entry was built from:
- the checkpoint's fingerprint (each file of the model directory: size and modification time). Another
  fingerprint now means the checkpoint changed: the entry is stale, never loaded, and rebuilt;
- a CRC-32 per tensor, checked on every load: a corrupt entry (a bad disk, an edit) is never loaded either.
Entries are written once, after the first quantization: to a temporary file, then renamed into place (a reader
sees the old file or the whole new one, never half of one), by one process at a time (a file lock; another
process writing the same entry meanwhile is left to it). A write that fails (disk full, a read-only cache)
costs the cache, never the load: the model just quantized is served and the warning names the cause.

Loading an entry builds the model's skeleton from its config.json with no memory behind the weights (accelerate's
init_empty_weights), swaps its linear layers for quantized shells as the quantization does, and assigns the
entry's tensors. Buffers a model computes when it is built (rotary frequencies, position ids) are not in a state
dict; they are built for real, as from_pretrained builds them.

`<NAME>_WEIGHT_CACHE` (or EMBED_WEIGHT_CACHE): the directory, `off` to turn it off; default
`$XDG_CACHE_HOME/embed-services/weights` (~/.cache/...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from embed_core.config import RunnerConfig

log = logging.getLogger(__name__)

CACHED_MODES = ("int8",)
# Bump when what an entry holds changes (its layout, or how a mode quantizes), so that old entries are not read.
FORMAT = "1"
OFF = ("off", "0", "no", "false", "none")
# Free space left on the cache's disk after a write: an entry never fills the disk to the last byte.
FREE_SPACE_MARGIN = 512 * 2**20


class CorruptEntry(Exception):
    """An entry that exists but must not be loaded: unreadable, stale, or failing its checksums."""


def cache_directory(config: RunnerConfig) -> Path | None:
    """Where the entries live; None when the cache is off."""
    configured = config.weight_cache.strip()
    if configured.lower() in OFF:
        return None
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "embed-services" / "weights"


def fingerprint(model_dir: Path) -> dict[str, list[int]]:
    """Each file of the checkpoint's directory: [size, mtime in ns]. A changed, added or removed file changes it
    (what make and rsync compare; hashing 16 GB at every load would cost more than the load it saves)."""
    found = {}
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            stat = path.stat()
            found[path.name] = [stat.st_size, stat.st_mtime_ns]
    return found


def recipe(quantization: str) -> str:
    """What decides a mode's quantized values, besides the weights: an entry made with another recipe is stale."""
    if quantization == "int8":
        from .int8 import BALANCING_ROUNDS, INT8_MAX

        return f"int8-sinq-rounds{BALANCING_ROUNDS}-max{INT8_MAX}"
    return quantization


def checksum(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.detach().reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class WeightCache:
    """The entry of one model (checkpoint, mode, dtype, class) in the cache directory."""

    path: Path
    model_dir: Path
    quantization: str
    dtype: torch.dtype
    auto_class: Any

    @classmethod
    def for_model(
        cls, model_dir: Path, config: RunnerConfig, auto_class: Any, dtype: torch.dtype
    ) -> WeightCache | None:
        directory = cache_directory(config)
        if directory is None or config.quantization not in CACHED_MODES:
            return None
        key = {
            "format": FORMAT,
            "checkpoint": str(model_dir.resolve()),
            "recipe": recipe(config.quantization),
            "dtype": str(dtype),
            "class": f"{auto_class.__module__}.{auto_class.__qualname__}",
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        name = f"{model_dir.resolve().name}-{config.quantization}-{digest}.safetensors"
        return cls(directory / name, model_dir, config.quantization, dtype, auto_class)

    # -- reading ----------------------------------------------------------------------------------------

    def load(self, device: torch.device) -> Any | None:
        """The quantized model from the entry, on `device`; None when there is no usable entry (missing, or
        stale or corrupt: said in the log, and the caller's quantization writes a new one)."""
        if not self.path.is_file():
            log.info("no cached %s weights yet at %s: quantizing the checkpoint", self.quantization, self.path)
            return None
        try:
            tensors, aliases = self._read_checked()
            model = self._assign(tensors, aliases, device)
        except CorruptEntry as exc:
            log.warning("not loading the cached weights %s: %s; quantizing the checkpoint again", self.path, exc)
            return None
        log.info("loaded the cached %s weights from %s", self.quantization, self.path)
        return model

    def _read_checked(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(self.path), framework="pt") as entry:
                metadata = entry.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CorruptEntry(f"written by another format ({metadata.get('format')!r}, this is {FORMAT!r})")
            if json.loads(metadata["fingerprint"]) != fingerprint(self.model_dir):
                raise CorruptEntry(f"stale: the checkpoint's files in {self.model_dir} changed since it was written")
            sums, aliases = json.loads(metadata["checksums"]), json.loads(metadata["aliases"])
            tensors = load_file(str(self.path))
        except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
            raise CorruptEntry(f"unreadable ({type(exc).__name__}: {exc})") from None
        if set(tensors) != set(sums):
            raise CorruptEntry("its tensors are not those its metadata lists")
        for name, tensor in tensors.items():
            if checksum(tensor) != sums[name]:
                raise CorruptEntry(f"corrupt: tensor {name!r} fails its checksum")
        return tensors, aliases

    def _assign(self, tensors: dict[str, torch.Tensor], aliases: dict[str, str], device: torch.device) -> Any:
        placed = {name: tensor.to(device) for name, tensor in tensors.items()}
        placed.update({alias: placed[name] for alias, name in aliases.items()})  # tied weights: one tensor
        model = self.skeleton()
        try:
            model.load_state_dict(placed, strict=True, assign=True)
        except RuntimeError as exc:  # missing or unexpected keys, other shapes
            raise CorruptEntry(f"it does not fit the model ({exc})") from None
        left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
        if left:
            raise CorruptEntry(f"it holds no value for {', '.join(left[:5])}")
        return model.to(device)  # the buffers built at construction (the weights are there already)

    def skeleton(self) -> Any:
        """The model as the quantization leaves it, with no memory behind its weights (meta tensors)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        from .loading import swap_in_quantized_layers

        model_config = AutoConfig.from_pretrained(str(self.model_dir))
        build = getattr(self.auto_class, "from_config", None) or self.auto_class._from_config
        with init_empty_weights(include_buffers=False):
            model = build(model_config, dtype=self.dtype)
            swap_in_quantized_layers(model, self.quantization, torch.device("meta"))
        return model

    # -- writing ----------------------------------------------------------------------------------------

    def store(self, model: Any) -> str | None:
        """Write the entry for `model` (just quantized) unless another process is writing it. Returns why it was
        not written (also logged as a warning), None when it was or another process was writing it."""
        from filelock import FileLock, Timeout

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tensors, aliases = _unique_tensors(model.state_dict())
            size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
            free = shutil.disk_usage(self.path.parent).free
            if free < size + FREE_SPACE_MARGIN:
                return self._not_written(
                    f"not enough free space in {self.path.parent}: the entry needs {size / 2**20:.0f} MiB "
                    f"(+{FREE_SPACE_MARGIN / 2**20:.0f} MiB kept free), {free / 2**20:.0f} MiB is free"
                )
            with FileLock(str(self.path) + ".lock", timeout=0):
                self._write(tensors, aliases)
        except Timeout:
            log.info("another process is writing %s; leaving it to it", self.path)
        except OSError as exc:  # disk full, read-only, permissions
            return self._not_written(f"{type(exc).__name__}: {exc}")
        return None

    def _write(self, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
        from safetensors.torch import save_file

        for stale in self.path.parent.glob(f"{self.path.name}.*.tmp"):  # left by a writer killed mid-write
            stale.unlink(missing_ok=True)
        metadata = {
            "format": FORMAT,
            "checkpoint": str(self.model_dir),
            "quantization": self.quantization,
            "fingerprint": json.dumps(fingerprint(self.model_dir)),
            "checksums": json.dumps({name: checksum(tensor) for name, tensor in tensors.items()}),
            "aliases": json.dumps(aliases),
        }
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(temporary), metadata=metadata)
            with temporary.open("rb") as written:
                os.fsync(written.fileno())  # on disk before the rename makes it the entry
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)
        log.info("wrote the %s weights to %s for the next load", self.quantization, self.path)

    def _not_written(self, why: str) -> str:
        message = f"the quantized weights were not cached at {self.path} ({why}); the next load quantizes again"
        log.warning("%s", message)
        return message


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict on the CPU with each tensor once (safetensors refuses shared ones) and, for a name whose
    tensor another name holds already (tied embeddings), that other name."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, aliases
