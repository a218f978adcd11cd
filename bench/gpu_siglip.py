"""GPU throughput of the SigLIP2 image runner, decode included, on a random-weight so400m/16@512 model.

    python bench/gpu_siglip.py [--images N] [--out results.json]

The weights are random, the shapes are google/siglip2-so400m-patch16-512's vision tower (the text
tower is cut to two layers and a tiny vocabulary: it is not what this measures). Images are real
640x480 JPEG files, decoded, EXIF-transposed and resized by the service's own code in its decode
threads, then embedded in shared batches: images/s is the end-to-end rate of `embed_images`.

Then 12-MP photos (4032x3024 JPEGs, tests/pictures.py's photo_like, EXIF-rotated), end to end with
the box's CPU cores as decode threads, decoded on the CPU (GPU_DECODE=0) and with nvJPEG (GPU_DECODE=1,
needs torchvision), next to the vision tower alone: the issue-11 target is >= 90% of the tower's rate.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from embed_core.config import RunnerConfig  # noqa: E402
from embed_core.table import SERVICES  # noqa: E402
from tests.conftest import build_siglip2_tokenizer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the script itself (--smoke)
SO400M_VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=512,
    patch_size=16,
)


def save_model(directory: Path, vision: dict) -> None:
    from transformers import AutoTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    build_siglip2_tokenizer(directory)
    vocab = len(AutoTokenizer.from_pretrained(str(directory)))
    config = SiglipConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=2,
            num_attention_heads=16,
            max_position_embeddings=64,
        ),
        vision_config=vision,
    )
    with torch.device(DEVICE):
        model = SiglipModel(config).to(torch.bfloat16)
    model.save_pretrained(str(directory))
    size = vision["image_size"]
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(str(directory))


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def jpeg_files(count: int) -> list[bytes]:
    from PIL import Image

    files = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        pixels = (torch.rand(480, 640, 3, generator=generator) * 255).to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def photo_files(count: int) -> list[bytes]:
    from PIL import Image

    from tests.pictures import TWELVE_MP, encode, photo_like

    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        encode(
            photo_like(*TWELVE_MP, seed=index).transpose(Image.Transpose.ROTATE_90),
            "JPEG",
            quality=90,
            exif=exif.tobytes(),
        )
        for index in range(count)
    ]


def measure_photos(directory: Path, spec, requests: int) -> list[dict]:
    """12-MP JPEGs end to end, decoded on the CPU and then on the GPU (only on CUDA)."""
    from runners.siglip import SiglipEmbedder

    files = photo_files(16)
    rows = []
    for gpu_decode in ("0", "1") if DEVICE == "cuda" else ("0",):
        os.environ.update(
            {
                spec.model_env: str(directory),
                "EMBED_DEVICE": DEVICE,
                "SIGLIP2_EMBED_MAX_BATCH_IMAGES": "64",
                "SIGLIP2_EMBED_MAX_IMAGES_PER_REQUEST": "64",
                spec.quantization_env: "none",
                "SIGLIP2_EMBED_GPU_DECODE": gpu_decode,
            }
        )
        os.environ.pop("SIGLIP2_EMBED_DECODE_THREADS", None)  # the default: every usable core
        embedder = SiglipEmbedder(spec, RunnerConfig.from_env(spec))

        async def load(embedder: SiglipEmbedder, count: int) -> None:
            semaphore = asyncio.Semaphore(4)

            async def one() -> None:
                async with semaphore:
                    await embedder.embed_images(files * 4)  # 64-image requests

            await asyncio.gather(*(one() for _ in range(count)))

        asyncio.run(load(embedder, 1))  # warm-up
        sync()
        start = time.perf_counter()
        asyncio.run(load(embedder, requests))
        sync()
        rate = requests * 64 / (time.perf_counter() - start)
        rows.append(
            {
                "variant": f"12-MP JPEGs end to end, {'GPU (nvJPEG)' if gpu_decode == '1' else 'CPU'} decode",
                "images_per_s": rate,
                "decode_threads": embedder.settings.decode_threads,
                "gpu_decode": embedder.gpu_jpeg is not None,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        embedder.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--out", default="siglip_results.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny vision tower: check the script itself")
    parser.add_argument("--photo-requests", type=int, default=8, help="64-image requests of 12-MP JPEGs; 0: skip")
    args = parser.parse_args()
    from runners.siglip import SiglipEmbedder

    directory = Path(tempfile.mkdtemp())
    vision = dict(SO400M_VISION, num_hidden_layers=1, image_size=64) if args.smoke else SO400M_VISION
    save_model(directory, vision)
    files = jpeg_files(64)
    spec = SERVICES["siglip2_embed"]
    results = []
    batch_images = "64"
    for quantization in ("none", "fp8"):
        os.environ.update(
            {
                spec.model_env: str(directory),
                "EMBED_DEVICE": DEVICE,
                "SIGLIP2_EMBED_MAX_BATCH_IMAGES": batch_images,
                "SIGLIP2_EMBED_MAX_IMAGES_PER_REQUEST": "64",
                spec.quantization_env: quantization,
            }
        )
        started = time.perf_counter()
        embedder = SiglipEmbedder(spec, RunnerConfig.from_env(spec))
        print(f"loaded ({quantization}, compiled={embedder.compiled}) in {time.perf_counter() - started:.1f}s")

        async def load(embedder: SiglipEmbedder, requests: int) -> None:
            # 64-image requests from 4 concurrent clients, as an indexing job would send them.
            semaphore = asyncio.Semaphore(4)

            async def one() -> None:
                async with semaphore:
                    await embedder.embed_images(list(files))

            await asyncio.gather(*(one() for _ in range(requests)))

        asyncio.run(load(embedder, 2))  # warm-up
        sync()
        start = time.perf_counter()
        asyncio.run(load(embedder, args.images // 64))
        sync()
        seconds = time.perf_counter() - start
        rate = (args.images // 64) * 64 / seconds
        row = {
            "variant": f"service runner, decode included, batches of {batch_images}, {quantization}",
            "images_per_s": rate,
            "seconds": seconds,
            "dtype": str(embedder.dtype),
            "decode_threads": embedder.settings.decode_threads,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        # The model alone, on preprocessed batches: where the time goes.
        size = vision["image_size"]
        pixels = torch.randn(int(batch_images), 3, size, size, device=DEVICE, dtype=embedder.dtype)
        with torch.inference_mode():
            embedder.model.get_image_features(pixel_values=pixels)
            sync()
            start = time.perf_counter()
            for _ in range(8):
                embedder.model.get_image_features(pixel_values=pixels)
            sync()
        model_rate = 8 * int(batch_images) / (time.perf_counter() - start)
        results.append(
            {"variant": f"vision tower alone, batches of {batch_images}, {quantization}", "images_per_s": model_rate}
        )
        print(json.dumps(results[-1]), flush=True)
        embedder.close()
    if args.photo_requests:
        results += measure_photos(directory, spec, args.photo_requests)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"
    Path(args.out).write_text(json.dumps({"gpu": gpu, "results": results}, indent=1))


if __name__ == "__main__":
    main()
