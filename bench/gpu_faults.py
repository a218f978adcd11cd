"""A real CUDA out-of-memory on a long batch: the runner splits the micro-batch, succeeds, and keeps serving.

    python bench/gpu_faults.py [--out results.json]

Needs a CUDA GPU (tests/test_faults.py covers the same path on the CPU with a simulated OOM). A random-weight
model of Qwen3-4B's shape, run padded (EMBED_PACKED=0) with a token budget far above what fits, so that the
first micro-batch of long texts really runs out of device memory; ballast fills the card first so that this
happens at any card size. Checks: the vectors equal those computed a few texts at a time (cosine >= 0.999),
the runner answers a small request afterwards, and the memory held after it is back near what it was before.
Not yet measured (no GPU in the session that wrote it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from gpu_throughput import QWEN3_4B, embedder_for, random_model, token_texts  # noqa: E402

from tests.conftest import build_qwen_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per text")
    parser.add_argument("--leave-gib", type=float, default=6.0, help="device memory left free by the ballast")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        build_qwen_tokenizer(Path(tmp), appends_end_of_text=True)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tmp)
        model = random_model("qwen3", QWEN3_4B)
        budget = str(args.texts * args.tokens)  # one micro-batch for everything: far more than fits
        embedder = embedder_for("qwen3_4b_embed", model, tokenizer, EMBED_PACKED="0", EMBED_MAX_BATCH_TOKENS=budget)
        texts = token_texts(args.texts, args.tokens, args.tokens, QWEN3_4B["vocab_size"], seed=0)

        free, total = torch.cuda.mem_get_info()
        ballast_bytes = max(0, int(free - args.leave_gib * 2**30))
        ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device="cuda")
        held_before = torch.cuda.memory_allocated()
        ooms: list[int] = []
        import runners.batching as batching

        original = batching.run_splitting_on_oom

        def counting(run, indices):
            def wrapped(part):
                try:
                    return run(part)
                except torch.OutOfMemoryError:
                    ooms.append(len(part))
                    raise

            return original(wrapped, indices)

        batching.run_splitting_on_oom = counting
        import runners.embedder as embedder_module

        embedder_module.run_splitting_on_oom = counting
        started = time.perf_counter()
        vectors = embedder.embed_token_ids(texts)
        seconds = time.perf_counter() - started
        embedder_module.run_splitting_on_oom = batching.run_splitting_on_oom = original

        # The reference: the same texts four at a time (fits), through the same runner.
        reference = [v for start in range(0, len(texts), 4) for v in embedder.embed_token_ids(texts[start : start + 4])]
        cosines = [
            torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0).item()
            for a, b in zip(vectors, reference, strict=True)
        ]
        after = embedder.embed_token_ids(token_texts(1, 16, 16, QWEN3_4B["vocab_size"], seed=1))
        torch.cuda.empty_cache()
        held_after = torch.cuda.memory_allocated()
        del ballast
        result = {
            "device": torch.cuda.get_device_name(),
            "total_gib": round(total / 2**30, 1),
            "texts": args.texts,
            "tokens_per_text": args.tokens,
            "ooms_caught": len(ooms),
            "oom_batch_sizes": ooms[:20],
            "seconds": round(seconds, 2),
            "min_cosine": min(cosines),
            "serves_after": len(after) == 1,
            "held_mib_before": round(held_before / 2**20),
            "held_mib_after": round(held_after / 2**20),
        }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    ok = result["ooms_caught"] > 0 and result["min_cosine"] >= 0.999 and result["serves_after"]
    ok = ok and held_after - held_before < 512 * 2**20
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
