"""Index a generated photo folder through a running SigLIP2 service and say where the time went.

    python bench/index_cpu.py --count 200                          # CPU: random weights of base/16 @224
    python bench/index_cpu.py --model /models/siglip2-so400m-patch16-512 --device cuda --count 500   # a GPU

Starts `bentoml serve service:Siglip2Embed` on the model (by default a random-weight checkpoint of
google/siglip2-base-patch16-224's shape, built here: the photos-cpu profile's model, no download),
indexes the folder with `embed_client.index_folder` into a fresh Qdrant local store, then indexes it
again (everything unchanged). Reports photos/s, the client's time reading and hashing files, its time in
HTTP round trips to the service, and the service's own model time (`embed_compute_seconds` from its
/metrics); what is left of the round trips is transfer, decoding and resizing in the service, and queueing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.index_corpus import corpus  # noqa: E402
from embed_client import index_folder  # noqa: E402


def base_224_checkpoint(directory: Path) -> Path:
    """google/siglip2-base-patch16-224's architecture (SiglipModel: the fixed-resolution SigLIP2 checkpoints)
    and processor settings, with random weights. The tokenizer is the tests' tiny Gemma one: the text tower
    only embeds queries, which this benchmark does not time."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    from tests.conftest import build_siglip2_tokenizer

    if (directory / "config.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    build_siglip2_tokenizer(directory)
    tower = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    config = SiglipConfig(
        text_config=dict(vocab_size=256000, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, **tower),
        vision_config=dict(image_size=224, patch_size=16, **tower),
    )
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(str(directory))
    SiglipImageProcessor(size={"height": 224, "width": 224}, resample=2).save_pretrained(str(directory))
    return directory


def compute_seconds(url: str) -> float:
    """The service's model time so far: embed_compute_seconds_sum summed over its series."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(value) for value in re.findall(r"^embed_compute_seconds_sum\{[^}]*\} (\S+)$", text, re.M))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200, help="photos in the generated folder")
    parser.add_argument("--folder", type=Path, help="the photo folder (generated there if missing)")
    parser.add_argument("--model", type=Path, help="a SigLIP2 checkpoint (default: random base/16 @224)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args()

    from tests.conftest import serve

    work = Path(tempfile.mkdtemp(prefix="index-bench-"))
    folder = args.folder or work / "photos"
    if not folder.exists():
        started = time.monotonic()
        corpus(folder, args.count)
        print(f"generated {args.count} photos in {time.monotonic() - started:.0f} s", file=sys.stderr)
    model = args.model or base_224_checkpoint(work / "siglip2-base-224-random")
    files = [path for path in folder.rglob("*") if path.is_file()]
    env = {"SIGLIP2_EMBED_MODEL": str(model), "SIGLIP2_EMBED_DEVICE": args.device, "EMBED_DEVICE": args.device}
    for served in serve("Siglip2Embed", env, work / "siglip.log", timeout=900):
        health = served.get("/health").json()
        before = compute_seconds(served.url)
        first = index_folder(
            folder,
            store=work / "store",
            service=served.url,
            text_service=None,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            progress=False,
        )
        model_seconds = compute_seconds(served.url) - before
        second = index_folder(folder, store=work / "store", service=served.url, text_service=None, progress=False)
    figures = {
        "photos": first.found,
        "megabytes": round(sum(path.stat().st_size for path in files) / 1e6),
        "errors": len(first.errors),
        "model": health.get("model"),
        "device": health.get("device"),
        "compiled": health.get("compiled"),
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "seconds": round(first.seconds, 1),
        "photos_per_s": round(first.embedded / first.seconds, 2),
        "client_read_hash_s": round(first.timings["read"], 1),
        "client_http_s": round(first.timings["images"], 1),
        "client_store_s": round(first.timings["store"], 1),
        "service_model_s": round(model_seconds, 1),
        "second_run_s": round(second.seconds, 2),
        "second_run_unchanged": second.unchanged,
    }
    print(first.summary())
    print(second.summary())
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
