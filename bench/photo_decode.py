"""What a photo costs the image service's CPU before the model sees it: its decode path against the
naive one (the whole picture decoded, then the checkpoint's own image processor), in the same run.

    python bench/photo_decode.py                       # in process, then through a running service
    python bench/photo_decode.py --skip-service        # in process only
    python bench/photo_decode.py --write BENCHMARKS.md # append the tables

In process, one thread, for each file of bench/photo_corpus.py: CPU ms per image of the service's
prepare_image (decode no more than needed, the final resize) and of the naive path, their ratio, and the
difference of the two model inputs in levels of 0..255 (mean and max over the 512 x 512 x 3 input; the
naive path here includes the sRGB conversion, so that only the decode path differs). Also what the ICC
conversion costs on a 12-MP Display P3 JPEG (the same file with and without its profile).

Through the service: `bentoml serve` of the SigLIP2 service on a tiny random 512 x 512 vision model,
8-image requests of the 12-MP EXIF-rotated JPEG from 2 clients, as multipart files and as base64 JSON:
images/s and the server's CPU ms per image. Wall-clock figures depend on everything else the machine runs;
the ratios come from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

import torch  # noqa: E402
from cpu_serving import cpu_seconds, free_port, machine, start, stop  # noqa: E402
from photo_corpus import corpus  # noqa: E402
from PIL import Image, ImageCms, ImageOps  # noqa: E402

from embed_core.table import SERVICES  # noqa: E402
from tests.conftest import save_tiny_siglip  # noqa: E402
from tests.pictures import TWELVE_MP, display_p3, encode, photo_like  # noqa: E402

SPEC = SERVICES["siglip2_embed"]


def naive(embedder, data: bytes, srgb: bool = False) -> torch.Tensor:
    """The model card's recipe: full decode, upright, RGB (sRGB-converted when asked), the processor."""
    image = Image.open(io.BytesIO(data))
    image.load()
    icc = image.info.get("icc_profile")
    image = ImageOps.exif_transpose(image).convert("RGB")
    if srgb and icc:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        image = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"))
    return embedder.image_processor(images=[image], return_tensors="pt")["pixel_values"]


def cpu_ms(function, repeats: int) -> float:
    function()  # warm: caches, the ICC transform
    started = time.process_time()
    for _ in range(repeats):
        function()
    return 1000 * (time.process_time() - started) / repeats


def in_process(embedder, files: dict[str, bytes], repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    fixed = embedder.fixed_size
    rows = []
    for name, data in files.items():
        service = cpu_ms(lambda data=data: embedder.prepare_image(data), repeats)
        plain = cpu_ms(lambda data=data: naive(embedder, data), repeats)
        served = embedder.prepare_image(data).inputs["pixel_values"].float()
        reference = (naive(embedder, data, srgb=True) * fixed.std[0] + fixed.mean[0]) / fixed.rescale_factor
        difference = (served - reference).abs()
        size = Image.open(io.BytesIO(data)).size
        rows.append(
            {
                "file": name,
                "size": f"{size[0]}x{size[1]}",
                "service_cpu_ms": service,
                "naive_cpu_ms": plain,
                "ratio": service / plain,
                "mean_levels": float(difference.mean()),
                "max_levels": float(difference.max()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def icc_cost(embedder, repeats: int) -> dict:
    photo = photo_like(*TWELVE_MP, seed=9)
    tagged, plain = encode(photo, "JPEG", quality=90, icc_profile=display_p3()), encode(photo, "JPEG", quality=90)
    row = {
        "with_p3_cpu_ms": cpu_ms(lambda: embedder.prepare_image(tagged), repeats),
        "without_cpu_ms": cpu_ms(lambda: embedder.prepare_image(plain), repeats),
    }
    print(json.dumps(row), flush=True)
    return row


def forward_cost(embedder, repeats: int) -> float:
    """CPU ms per image of the tiny model's own forward (8-image batches): the part of the server's CPU
    that is not decoding or serving, measured in process so it can be taken out."""
    from runners.siglip import PreparedImage

    torch.set_num_threads(2)  # as the service runs it on this machine
    fixed = embedder.fixed_size
    blank = [PreparedImage({"pixel_values": torch.zeros(1, 3, fixed.height, fixed.width, dtype=torch.uint8)})] * 8
    return cpu_ms(lambda: embedder._forward_images(blank), repeats) / 8


def through_service(model: Path, data: bytes, requests: int, logs: Path) -> dict:
    """The same 8 photos per request, as multipart files and then as base64 in JSON (what most clients send)."""
    import httpx

    port = free_port()
    env = {
        **os.environ,
        SPEC.model_env: str(model),
        "EMBED_DEVICE": "cpu",
        "EMBED_QUANTIZATION": "none",
        "SIGLIP2_EMBED_DECODE_THREADS": "2",
        "BENTOML_DO_NOT_TRACK": "true",
    }
    command = [sys.executable, "-m", "bentoml", "serve", f"service:{SPEC.class_name}", "--port", str(port)]
    process = start(command, env, f"http://127.0.0.1:{port}/health", logs / "photo_service.log")
    url = f"http://127.0.0.1:{port}/embed/images"
    bodies = {
        "multipart": {"files": [("images", (f"photo{i}.jpg", data, "image/jpeg")) for i in range(8)]},
        "json": {"json": {"images": [base64.b64encode(data).decode()] * 8}},
    }

    async def load(body: dict) -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            semaphore = asyncio.Semaphore(2)

            async def one() -> None:
                async with semaphore:
                    response = await client.post(url, **body)
                    assert response.status_code == 200, response.text

            await asyncio.gather(*(one() for _ in range(requests)))

    rows = {}
    try:
        for name, body in bodies.items():
            with httpx.Client(timeout=300) as client:
                assert client.post(url, **body).status_code == 200  # warm
            before, started = cpu_seconds(process.pid), time.perf_counter()
            asyncio.run(load(body))
            seconds, cpu = time.perf_counter() - started, cpu_seconds(process.pid) - before
            per_image = 1000 * cpu / (8 * requests)
            rows[name] = {"images_per_s": 8 * requests / seconds, "server_cpu_ms_per_image": per_image}
            print(name, json.dumps(rows[name]), flush=True)
    finally:
        stop(process)
    return rows


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}. Command: `{results['command']}`.",
        "",
        "| file | size | service decode path, CPU ms | naive (full decode + processor), CPU ms | ratio "
        "| model input vs naive+sRGB, mean / max levels |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["in_process"]:
        lines.append(
            f"| {row['file']} | {row['size']} | {row['service_cpu_ms']:.0f} | {row['naive_cpu_ms']:.0f} "
            f"| {row['ratio']:.2f}x | {row['mean_levels']:.2f} / {row['max_levels']:.0f} |"
        )
    icc = results["icc"]
    lines += [
        "",
        f"ICC conversion: a 12-MP JPEG with a Display P3 profile {icc['with_p3_cpu_ms']:.0f} CPU ms through the "
        f"decode path, the same file without it {icc['without_cpu_ms']:.0f} ms.",
    ]
    if results.get("service"):
        service, forward = results["service"]["multipart"], results["forward_cpu_ms_per_image"]
        as_json = results["service"]["json"]
        naive_jpeg = results["in_process"][0]["naive_cpu_ms"]
        rest = service["server_cpu_ms_per_image"] - forward
        lines += [
            "",
            f"Through the service (8 x 12-MP EXIF-rotated JPEG per request, 2 clients, 2 decode threads): "
            f"{service['images_per_s']:.2f} images/s, {service['server_cpu_ms_per_image']:.0f} server CPU ms "
            f"per image ({service['server_cpu_ms_per_image'] / naive_jpeg:.2f}x the naive path's "
            f"{naive_jpeg:.0f} ms). The tiny 512x512 model's own forward takes {forward:.0f} CPU ms per image "
            f"(in process, 8-image batches); the rest, decoding and serving, {rest:.0f} ms "
            f"({rest / naive_jpeg:.2f}x the naive path).",
            "",
            f"The same 8 photos per request as base64 in JSON: {as_json['images_per_s']:.2f} images/s, "
            f"{as_json['server_cpu_ms_per_image']:.0f} server CPU ms per image.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=8, help="8-image requests through the service")
    parser.add_argument("--skip-service", action="store_true")
    parser.add_argument("--write", help="append the markdown tables to this file")
    args = parser.parse_args()
    from embed_core.config import RunnerConfig
    from runners.images import ImageSettings
    from runners.siglip import SiglipEmbedder

    model = save_tiny_siglip(Path(tempfile.mkdtemp()), image_size=512)
    os.environ.update({SPEC.model_env: str(model), "EMBED_DEVICE": "cpu", "EMBED_QUANTIZATION": "none"})
    embedder = SiglipEmbedder(SPEC, RunnerConfig.from_env(SPEC), ImageSettings.from_env(SPEC))
    files = corpus()
    results = {
        "machine": machine(),
        "command": "python bench/photo_decode.py " + " ".join(sys.argv[1:]),
        "in_process": in_process(embedder, files, args.repeats),
        "icc": icc_cost(embedder, args.repeats),
        "forward_cpu_ms_per_image": forward_cost(embedder, args.repeats),
    }
    embedder.close()
    if not args.skip_service:
        logs = REPO / "bench" / "logs"
        logs.mkdir(exist_ok=True)
        results["service"] = through_service(model, files["jpeg-12mp-exif-rotated.jpg"], args.requests, logs)
    text = markdown(results)
    print(text)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as out:
            out.write(text)


if __name__ == "__main__":
    main()
