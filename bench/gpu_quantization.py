"""The quantization modes on a GPU: accuracy, speed and memory, on random-weight models of the real shapes.

    python bench/gpu_quantization.py [--part accuracy speed memory] [--out gpu_quantization.json]
    python bench/gpu_quantization.py --smoke     # tiny shapes on any device: checks the script itself

One prepared run for a session that has a GPU (an H200 takes a few minutes; the fp32 reference of the
8B shape needs ~31 GB, so accuracy wants a card of 48 GB or more). Parts:

- accuracy: the Qwen3-8B shape, 64 short texts. fp32 vectors first; bf16's cosine to them (bf16's own
  drift); then each mode's cosine to bf16 (int8 weight-only, bnb-int8, nf4, fp8), so that a mode's
  figure reads against the drift bf16 itself has.
- speed: the same runner (TextEmbedder, packed; compiled where the layers allow) per mode: 1024 short
  texts (8-64 tokens) in one call, and one short query alone (median of 20). The bars: int8 at most
  1.15x bf16's batch time, and its single-query latency no worse than bf16's.
- memory: each service of the high, balanced and light profiles on its own (as it runs in its own
  process), at the profile's quantization, one forward of EMBED_MAX_BATCH_TOKENS tokens (16384, the
  default; SigLIP2 a batch of 32 images): peak memory torch reserved, plus the CUDA context, against
  the estimate embed_ops/profiles.py prints.

bitsandbytes layers are put in the way transformers does for BitsAndBytesConfig (Linear8bitLt with
threshold 6.0; Linear4bit nf4 with bf16 compute), without writing the 8B model to disk.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from gpu_throughput import BERT_LARGE, QWEN3_4B, QWEN3_8B, TINY  # noqa: E402  (the real shapes)

from embed_core.config import RunnerConfig  # noqa: E402
from embed_core.table import SERVICES  # noqa: E402
from embed_ops.profiles import BYTES_PER_PARAM, PROFILES  # noqa: E402
from runners.embedder import TextEmbedder  # noqa: E402
from runners.fp8 import quantize_model_fp8  # noqa: E402
from runners.int8 import quantize_model_int8  # noqa: E402
from runners.packed import PackedQwen3  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODES = ("none", "int8", "bnb-int8", "nf4", "fp8")
SIGLIP_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=512, patch_size=16)  # fmt: skip
SIGLIP_TEXT = dict(vocab_size=256000, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                   num_attention_heads=16, max_position_embeddings=64)  # fmt: skip
SHAPES = {"qwen3_8b_embed": QWEN3_8B, "qwen3_8b_rerank": QWEN3_8B, "qwen3_4b_embed": QWEN3_4B,
          "qwen3_4b_rerank": QWEN3_4B, "bge_embed": BERT_LARGE}  # fmt: skip


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def qwen3(shape: dict, dtype: torch.dtype):
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen3Model(Qwen3Config(**shape, tie_word_embeddings=False))
    return model.to(dtype).eval()


def bnb_swap(model, mode: str) -> None:
    """nn.Linear -> bitsandbytes layers, quantized as they move to the GPU (as BitsAndBytesConfig does)."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            weight = child.weight.data.to("cpu", torch.bfloat16)
            if mode == "bnb-int8":
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=6.0)  # fmt: skip
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4")  # fmt: skip
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.to("cpu"), requires_grad=False)
            setattr(module, name, layer.to(DEVICE))
            del child


def quantize(model, mode: str) -> None:
    if mode == "int8":
        quantize_model_int8(model, DEVICE)
    elif mode == "fp8":
        quantize_model_fp8(model, DEVICE)
    elif mode in ("bnb-int8", "nf4"):
        bnb_swap(model, mode)


def texts(count: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(rng.randint(low, high))] for _ in range(count)]


def runner(model, tokenizer, seed_name: str = "qwen3_8b_embed", **env: str) -> TextEmbedder:
    spec = SERVICES[seed_name]
    os.environ.update({"EMBED_QUANTIZATION": "none", "EMBED_COMPILE": "1" if DEVICE.type == "cuda" else "0",
                       "EMBED_PACKED": "1", **env})  # fmt: skip
    return TextEmbedder.from_model(spec, RunnerConfig.from_env(spec), model, tokenizer)


def vectors(model, tokenizer, probe) -> torch.Tensor:
    return torch.stack(runner(model, tokenizer).embed_token_ids(probe)).float().cpu()


def free() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def accuracy(shape: dict, tokenizer, results: dict) -> None:
    probe = texts(64, 4, 64, shape["vocab_size"], 1)
    model = qwen3(shape, torch.float32)
    fp32 = torch.stack(runner(model, tokenizer, EMBED_COMPILE="0").embed_token_ids(probe)).float().cpu()
    model = model.to(torch.bfloat16)
    free()
    bf16 = vectors(model, tokenizer, probe)
    rows = {"bf16 vs fp32": F.cosine_similarity(bf16, fp32)}
    for mode in MODES[1:]:
        try:
            quantized = copy.deepcopy(model)
            quantize(quantized, mode)
            rows[f"{mode} vs bf16"] = F.cosine_similarity(vectors(quantized, tokenizer, probe), bf16)
        except Exception as exc:  # one mode failing must not cost the rest of the run
            results.setdefault("errors", []).append(f"accuracy {mode}: {type(exc).__name__}: {exc}")
        quantized = None
        free()
    for what, cosine in rows.items():
        results.setdefault("accuracy", {})[what] = {"min": cosine.min().item(), "mean": cosine.mean().item()}
        print(f"accuracy {what:18} cosine min {cosine.min():.5f} mean {cosine.mean():.5f}", flush=True)


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def speed(shape: dict, tokenizer, results: dict, batch: int, queries: int) -> None:
    short = texts(batch, 8, 64, shape["vocab_size"], 2)
    query = texts(1, 12, 12, shape["vocab_size"], 3)
    base = qwen3(shape, torch.bfloat16)
    for mode in MODES:
        try:
            model = base if mode == "none" else copy.deepcopy(base)
            quantize(model, mode)
            embedder = runner(model, tokenizer)
            embed = embedder.embed_token_ids
            embed(short[:64])  # warm-up
            seconds = timed(lambda embed=embed: embed(short))
            single = statistics.median(timed(lambda embed=embed: embed(query)) for _ in range(queries))
            compiled = isinstance(embedder.packed, PackedQwen3) and embedder.packed.compiled
            results.setdefault("speed", {})[mode] = {"batch_s": seconds, "query_s": single, "compiled": compiled}
        except Exception as exc:
            results.setdefault("errors", []).append(f"speed {mode}: {type(exc).__name__}: {exc}")
        model = embedder = None
        free()
    rows = results.get("speed", {})
    for mode, row in rows.items():
        ratio = row["batch_s"] / rows["none"]["batch_s"] if "none" in rows else float("nan")
        print(f"speed {mode:9} {batch} short texts {row['batch_s']:.3f} s ({ratio:.2f}x bf16), one query "
              f"{1000 * row['query_s']:.2f} ms, compiled={row['compiled']}", flush=True)  # fmt: skip


def service_peak(seed_name: str, mode: str, tokenizer, budget: int, smoke: bool) -> dict:
    """Peak memory of one service's model: weights + one forward at the batch budget."""
    free()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    spec = SERVICES[seed_name]
    if spec.kind == "image_embedding":
        from transformers import SiglipConfig, SiglipModel

        vision = {**SIGLIP_VISION, **({"num_hidden_layers": 2, "image_size": 64} if smoke else {})}
        text = {**SIGLIP_TEXT, **({"num_hidden_layers": 2, "vocab_size": 1000} if smoke else {})}
        with torch.device(DEVICE):
            model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).to(torch.bfloat16).eval()
        quantize(model, mode)
        side = vision["image_size"]
        with torch.inference_mode():
            model.get_image_features(
                pixel_values=torch.randn(2 if smoke else 32, 3, side, side, device=DEVICE, dtype=torch.bfloat16)
            )
    else:
        shape = TINY if smoke else SHAPES[seed_name]
        model = qwen3(shape, torch.bfloat16)
        quantize(model, mode)
        embedder = runner(model, tokenizer, seed_name, EMBED_MAX_BATCH_TOKENS=str(budget))
        length = 64 if smoke else 512
        embedder.embed_token_ids(texts(max(1, budget // length), length, length, shape["vocab_size"], 4))
    sync()
    peak = torch.cuda.max_memory_reserved() if DEVICE.type == "cuda" else 0
    model = None
    free()
    return {"mode": mode, "peak_reserved_gb": peak / 1e9}


def cuda_context_gb() -> float:
    """What the driver holds for a process before any tensor: total - free - what torch reserved."""
    if DEVICE.type != "cuda":
        return 0.0
    torch.zeros(1, device=DEVICE)
    free_bytes, total = torch.cuda.mem_get_info()
    return (total - free_bytes - torch.cuda.memory_reserved()) / 1e9


def memory(tokenizer, results: dict, smoke: bool) -> None:
    budget = 256 if smoke else 16384
    context = cuda_context_gb()
    measured: dict[str, dict] = {}
    for name in ("high", "balanced", "light"):
        profile = PROFILES[name]
        total, estimate = 0.0, 0.0
        for seed_name in profile.services:
            spec = SERVICES[seed_name]
            mode = profile.quantization.get(seed_name, spec.default_quantization)
            key = f"{seed_name}@{mode}"
            if key not in measured:
                try:
                    measured[key] = service_peak(seed_name, mode, tokenizer, budget, smoke)
                except Exception as exc:
                    results.setdefault("errors", []).append(f"memory {key}: {type(exc).__name__}: {exc}")
                    measured[key] = {"mode": mode, "peak_reserved_gb": float("nan")}
            total += measured[key]["peak_reserved_gb"] + context
            estimate += spec.params_billion * BYTES_PER_PARAM[mode]
            print(f"memory {name:8} {key:26} peak {measured[key]['peak_reserved_gb']:.2f} GB + context "
                  f"{context:.2f} GB", flush=True)  # fmt: skip
        results.setdefault("memory", {})[name] = {"measured_gb": total, "estimate_gb": estimate}
        print(f"memory {name:8} measured {total:.1f} GB (estimate printed today: {estimate:.1f} GB of weights)",
              flush=True)  # fmt: skip
    results["memory_services"] = measured
    results["cuda_context_gb"] = context


def main() -> None:
    import logging
    import tempfile

    from transformers import AutoTokenizer

    from tests.conftest import build_qwen_tokenizer

    logging.getLogger("runners").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", nargs="*", default=["accuracy", "speed", "memory"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script itself, on any device")
    parser.add_argument("--out", default="gpu_quantization.json")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp())
    build_qwen_tokenizer(directory, appends_end_of_text=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    shape = TINY if args.smoke else QWEN3_8B
    gpu = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (smoke run)"
    results: dict = {"info": {"gpu": gpu, "torch": torch.__version__}}
    print(json.dumps(results["info"]), flush=True)
    if "accuracy" in args.part:
        accuracy(shape, tokenizer, results)
    if "speed" in args.part:
        speed(shape, tokenizer, results, *((16, 3) if args.smoke else (1024, 20)))
    if "memory" in args.part:
        memory(tokenizer, results, args.smoke)
    for error in results.get("errors", []):
        print("FAILED", error, flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
