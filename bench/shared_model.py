"""One Qwen3-4B for both 4B ports, on the CPU: what sharing saves (memory) and costs (a hop per forward pass).

    python bench/shared_model.py
    python bench/shared_model.py --hidden 1024 --layers 8 --requests 20 --write BENCHMARKS.md

A random-weight Qwen3 in Z-Image-Turbo's layout (text_encoder/ + tokenizer/, tied embeddings), of the size given,
served three ways by `bentoml serve` on the CPU:

- the holder: Qwen3Embed4B, which holds the model;
- the sharer: Qwen3Rerank4B with QWEN3_4B_RERANK_MODEL_HOST pointing at the holder (no weights of its own);
- an own copy: Qwen3Rerank4B as it runs without sharing.

Reported: each server's RSS (its process tree, after a warm-up), the median time of one `POST /rerank` of
`--documents` documents on the sharer and on the own copy (alternating, one request at a time), their ratio,
and the largest difference between the two services' scores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from cpu_serving import append_report, free_port, machine, start, stop  # noqa: E402
from idle_unload import tree_rss  # noqa: E402

MIB = 2**20


def build_checkpoint(root: Path, hidden: int, layers: int) -> int:
    """Z-Image-Turbo's layout with a random Qwen3 of this size; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, Qwen3Model

    from tests.conftest import build_qwen_tokenizer, qwen3_config

    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    build_qwen_tokenizer(root / "tokenizer", appends_end_of_text=False)
    vocab = len(AutoTokenizer.from_pretrained(str(root / "tokenizer")))
    torch.manual_seed(0)
    heads = max(1, hidden // 128)
    config = qwen3_config(
        vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        head_dim=128 if hidden >= 128 else hidden,
        max_position_embeddings=8192,
    )
    model = Qwen3Model(config)
    model.save_pretrained(str(root / "text_encoder"))
    return sum(parameter.numel() for parameter in model.parameters())


def serve(class_name: str, env: dict[str, str], logs: Path) -> tuple[object, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "bentoml", "serve", f"service:{class_name}", "--port", str(port)]
    full_env = {**os.environ, "EMBED_DEVICE": "cpu", "BENTOML_DO_NOT_TRACK": "true", **env}
    return start(command, full_env, f"{url}/health", logs / f"{class_name}-{port}.log", timeout=900), url


def documents(count: int) -> list[str]:
    words = [
        "an",
        "orange",
        "cat",
        "sleeps",
        "in",
        "the",
        "sun",
        "on",
        "a",
        "wooden",
        "table",
        "near",
        "the",
        "window",
        "while",
        "rain",
        "falls",
        "outside",
    ]
    return [" ".join(words[index % 5 :] + words[: index % 5]) * 3 for index in range(count)]


def measure(hidden: int, layers: int, requests: int, count: int) -> dict:
    import httpx

    with tempfile.TemporaryDirectory() as scratch:
        root, logs = Path(scratch) / "z-image", Path(scratch) / "logs"
        logs.mkdir()
        parameters = build_checkpoint(root, hidden, layers)
        common = {"EMBED_QUANTIZATION": "none", "QWEN3_4B_EMBED_MODEL": str(root), "QWEN3_4B_RERANK_MODEL": str(root)}
        holder, holder_url = serve("Qwen3Embed4B", common, logs)
        sharer, sharer_url = serve("Qwen3Rerank4B", {**common, "QWEN3_4B_RERANK_MODEL_HOST": holder_url}, logs)
        own, own_url = serve("Qwen3Rerank4B", common, logs)
        try:
            body = {"query": "which picture shows a cat in the sun?", "documents": documents(count)}
            with httpx.Client(timeout=600) as client:
                answers = {}
                for url in (sharer_url, own_url):  # warm-up, and the answers to compare
                    answers[url] = client.post(f"{url}/rerank", json=body).raise_for_status().json()["results"]
                times: dict[str, list[float]] = {sharer_url: [], own_url: []}
                for _ in range(requests):
                    for url in (sharer_url, own_url):
                        started = time.perf_counter()
                        client.post(f"{url}/rerank", json=body).raise_for_status()
                        times[url].append(time.perf_counter() - started)
            scores = [{r["original_index"]: r["score"] for r in answers[url]} for url in (sharer_url, own_url)]
            return {
                "parameters": parameters,
                "documents": count,
                "requests": requests,
                "rss_mib": {
                    "holder": tree_rss(holder.pid) / MIB,
                    "sharer": tree_rss(sharer.pid) / MIB,
                    "own copy": tree_rss(own.pid) / MIB,
                },
                "median_s": {"sharer": statistics.median(times[sharer_url]), "own": statistics.median(times[own_url])},
                "max_score_difference": max(abs(scores[0][index] - scores[1][index]) for index in scores[0]),
            }
        finally:
            for process in (own, sharer, holder):
                stop(process)


def markdown(result: dict, command: str) -> str:
    rss = result["rss_mib"]
    ratio = result["median_s"]["sharer"] / result["median_s"]["own"]
    return "\n".join(
        [
            f"### One Qwen3-4B for two ports, CPU ({dt.date.today().isoformat()})",
            "",
            f"Machine: {machine()}. Command: `{command}`. A random Qwen3 of {result['parameters'] / 1e6:.0f} M "
            f"parameters (fp32) in Z-Image-Turbo's layout; `POST /rerank` of {result['documents']} documents, "
            f"{result['requests']} times on each reranker, alternating.",
            "",
            "| server | RSS (MiB) |",
            "|---|---:|",
            f"| Qwen3Embed4B, holding the model | {rss['holder']:.0f} |",
            f"| Qwen3Rerank4B on the holder's model (`QWEN3_4B_RERANK_MODEL_HOST`) | {rss['sharer']:.0f} |",
            f"| Qwen3Rerank4B with its own copy | {rss['own copy']:.0f} |",
            "",
            f"Rerank time, sharer / own copy (medians, one run): **{ratio:.2f}**. Largest score difference "
            f"between the two: {result['max_score_difference']:.1e}.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--write", type=Path, help="append the markdown to this file (BENCHMARKS.md)")
    args = parser.parse_args()
    result = measure(args.hidden, args.layers, args.requests, args.documents)
    report = markdown(result, "python bench/shared_model.py " + " ".join(sys.argv[1:]))
    print(json.dumps(result, indent=2))
    print(report)
    append_report(args.write, report)


if __name__ == "__main__":
    main()
