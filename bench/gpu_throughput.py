"""GPU throughput of the project's own runners on random-weight models of the real shapes.

    python bench/gpu_throughput.py [--quick] [--only NAME ...] [--out results.json]

Needs a CUDA GPU; no weights are downloaded (the weights are random, the shapes are the real
models'). Reports tokens/s (texts/s) and the fraction of the card's measured bf16 matmul rate,
counting model FLOPs as 2 x non-embedding parameters x tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from embed_core.config import RunnerConfig  # noqa: E402
from embed_core.table import SERVICES  # noqa: E402
from runners.embedder import TextEmbedder  # noqa: E402
from tests.conftest import build_qwen_tokenizer  # noqa: E402  (a tokenizer with Qwen's special tokens)

QWEN3_8B = dict(
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151665,
    max_position_embeddings=32768,
)
QWEN3_4B = dict(
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=32768,
)
BERT_LARGE = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    vocab_size=21128,
    max_position_embeddings=512,
)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the script itself (--smoke)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=700,
    max_position_embeddings=1024,
)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(size: int = 8192, repeats: int = 20) -> float:
    if DEVICE == "cpu":
        size, repeats = 512, 2
    a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def random_model(kind: str, shape: dict):
    from transformers import BertConfig, BertModel, Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    with torch.device(DEVICE):
        if kind == "qwen3":
            model = Qwen3Model(Qwen3Config(**shape, tie_word_embeddings=False, dtype="bfloat16"))
        else:
            model = BertModel(BertConfig(**shape), add_pooling_layer=False)
    return model.to(torch.bfloat16).eval()


def non_embedding_params(model) -> int:
    embedding = sum(p.numel() for name, p in model.named_parameters() if "embed" in name)
    return sum(p.numel() for p in model.parameters()) - embedding


def token_texts(count: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, min(vocab, 600)) for _ in range(rng.randint(low, high))] for _ in range(count)]


def timed(fn, *args) -> float:
    sync()
    start = time.perf_counter()
    fn(*args)
    sync()
    return time.perf_counter() - start


def naive_hf(model, texts: list[list[int]], batch_size: int = 64) -> None:
    """The baseline: Hugging Face forward, padded batches of 64 in arrival order."""
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            longest = max(map(len, chunk))
            ids = torch.zeros((len(chunk), longest), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, t in enumerate(chunk):
                ids[row, : len(t)] = torch.tensor(t)
                mask[row, : len(t)] = 1
            model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)).last_hidden_state[:, -1].float().cpu()


def embedder_for(seed_name: str, model, tokenizer, **env) -> TextEmbedder:
    import os

    spec = SERVICES[seed_name]
    for key in ("EMBED_PACKED", "EMBED_MAX_BATCH_TOKENS", "EMBED_COMPILE"):
        os.environ.pop(key, None)
    os.environ.update({"EMBED_QUANTIZATION": "none", **env})
    return TextEmbedder.from_model(spec, RunnerConfig.from_env(spec), model, tokenizer)


def run_text_model(name, seed_name, kind, shape, tokenizer, peak, results, quick, full_baseline, final=False):
    model = random_model(kind, shape)
    params = non_embedding_params(model)
    scale = 16 if DEVICE == "cpu" else (4 if quick else 1)
    sets = {
        "short 8-64": token_texts(4096 // scale, 8, 64, shape["vocab_size"], 1),
        "medium 64-512": token_texts(
            1024 // scale, 64, min(512, shape["max_position_embeddings"]), shape["vocab_size"], 2
        ),
    }
    variants = {"ours padded sorted 16k": {"EMBED_PACKED": "0", "EMBED_MAX_BATCH_TOKENS": "16384"}}
    if kind == "qwen3":
        variants = {
            "naive HF arrival-order b64": None,
            **variants,
            "ours packed 16k": {"EMBED_MAX_BATCH_TOKENS": "16384", "EMBED_COMPILE": "0"},
            "ours packed+compiled 16k": {"EMBED_MAX_BATCH_TOKENS": "16384", "EMBED_COMPILE": "1"},
            "ours packed+compiled 32k": {"EMBED_MAX_BATCH_TOKENS": "32768", "EMBED_COMPILE": "1"},
            # The memory-saving mode: FP8 weights (the model is quantized in place before these run).
            "ours fp8 packed+compiled 32k": {"EMBED_MAX_BATCH_TOKENS": "32768", "EMBED_COMPILE": "1", "fp8": "1"},
        }
        if final:
            variants = {name: env for name, env in variants.items() if "compiled 32k" in name}
        # Reranking is this forward on query+document pairs of 150-350 tokens, read at the last position.
        sets["rerank pairs 150-350"] = token_texts(1024 // scale, 150, 350, shape["vocab_size"], 3)
    if kind == "bert":  # PackedBert: varlen flash attention, compiled glue, CLS rows only in the last layer
        variants["ours packed 16k"] = {"EMBED_MAX_BATCH_TOKENS": "16384", "EMBED_COMPILE": "0"}
        variants["ours packed+compiled 16k"] = {"EMBED_MAX_BATCH_TOKENS": "16384", "EMBED_COMPILE": "1"}
        variants["ours packed+compiled 32k"] = {"EMBED_MAX_BATCH_TOKENS": "32768", "EMBED_COMPILE": "1"}
        if final:
            variants = {name: env for name, env in variants.items() if "compiled" in name}
    probe = sets["short 8-64"][:32]
    full_precision = None

    def runner_for(env):
        if env is None:
            return lambda batch: naive_hf(model, batch)
        return embedder_for(seed_name, model, tokenizer, **env).embed_token_ids

    for variant, env in variants.items():
        if env and env.pop("fp8", None):
            from runners.fp8 import quantize_model_fp8

            full_precision = torch.stack(runner_for({"EMBED_COMPILE": "1"})(probe))
            quantize_model_fp8(model, torch.device(DEVICE))
        for set_name, texts in sets.items():
            if env is None and set_name != "short 8-64" and not full_baseline:
                continue  # the naive baseline on the other sets: BENCHMARKS.md's first run
            tokens = sum(map(len, texts))
            try:
                run = runner_for(env)
                run(texts[:64])  # warm-up
                seconds = timed(run, texts)
            except Exception as exc:  # one broken variant must not cost the rest of a GPU lease
                print(f"{name} {set_name} {variant}: FAILED {type(exc).__name__}: {exc}", flush=True)
                results.append({"model": name, "texts": set_name, "variant": variant, "error": repr(exc)})
                continue
            rate = tokens / seconds
            row = {
                "model": name,
                "texts": set_name,
                "variant": variant,
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": rate,
                "texts_per_s": len(texts) / seconds,
                "matmul_fraction": 2 * params * rate / (peak * 1e12),
            }
            results.append(row)
            print(
                f"{name:14} {set_name:20} {variant:30} {rate:10.0f} tok/s {row['texts_per_s']:8.0f} texts/s "
                f"{100 * row['matmul_fraction']:5.1f}% of matmul",
                flush=True,
            )
    if kind == "bert":
        a = torch.stack(runner_for({"EMBED_COMPILE": "1"})(probe))
        b = torch.stack(runner_for({"EMBED_PACKED": "0"})(probe))
        check("PackedBert packed+compiled vs padded min cosine", name, a, b, results)
    if kind == "qwen3" and full_precision is None:  # the fast path computes what the padded one does
        a = torch.stack(runner_for({"EMBED_COMPILE": "1"})(probe))
        b = torch.stack(runner_for({"EMBED_PACKED": "0"})(probe))
        check("packed+compiled vs padded min cosine", name, a, b, results)
    elif full_precision is not None:
        check("fp8 vs bf16 min cosine", name, torch.stack(runner_for({"EMBED_COMPILE": "1"})(probe)), full_precision,
              results)  # fmt: skip


def check(what: str, name: str, a: torch.Tensor, b: torch.Tensor, results: list[dict]) -> None:
    cos = torch.nn.functional.cosine_similarity(a, b).min().item()
    print(f"{name}: {what} {cos:.5f}", flush=True)
    results.append({"model": name, "check": what, "value": cos})


def main() -> None:
    import logging

    logging.getLogger("runners").setLevel(logging.ERROR)  # tiny smoke shapes warn about dimensions
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer texts")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script itself, on any device")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--final", action="store_true", help="the compiled 32k variants only (bf16 and fp8)")
    parser.add_argument("--full-baseline", action="store_true", help="naive HF on every text set, not just short")
    parser.add_argument("--out", default="gpu_results.json")
    args = parser.parse_args()
    import tempfile

    from transformers import AutoTokenizer

    tokenizer_dir = Path(tempfile.mkdtemp())
    build_qwen_tokenizer(tokenizer_dir, appends_end_of_text=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    peak = matmul_tflops()
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"
    info = {"gpu": gpu, "torch": torch.__version__, "matmul_bf16_tflops": peak}
    print(json.dumps(info), flush=True)
    results: list[dict] = []
    runs = {
        "qwen3-8b-embed": ("qwen3_8b_embed", "qwen3", QWEN3_8B),
        "qwen3-4b-embed": ("qwen3_4b_embed", "qwen3", QWEN3_4B),
        "bert-large": ("bge_embed", "bert", BERT_LARGE),
    }
    for name, (seed_name, kind, shape) in runs.items():
        if args.only and name not in args.only:
            continue
        if args.smoke:
            shape = {**TINY, **({"vocab_size": 700} if kind == "qwen3" else {"max_position_embeddings": 512})}
            shape = {k: v for k, v in shape.items() if kind == "qwen3" or k not in ("num_key_value_heads", "head_dim")}
        run_text_model(
            name, seed_name, kind, shape, tokenizer, peak, results, args.quick, args.full_baseline, args.final
        )
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
