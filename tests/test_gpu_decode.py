"""GPU JPEG decoding (runners/gpu_decode.py), on the CPU: which files it takes, the turn to upright, the
resize, and the per-image fallback to the CPU path with its 4xx. nvJPEG itself needs a GPU
(bench/gpu_siglip.py measures it there); here Pillow stands in. torchvision's own decode_jpeg is checked where
torchvision is installed, on the GPU machine: bench/device_checks/, run by bench/gpu_session.sh."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from embed_core.errors import InputError, ModelLoadError
from embed_core.table import SERVICES
from runners.gpu_decode import GpuJpegDecoder, _upright, gpu_decode_on
from runners.images import UPRIGHT, ImageLimits, ImageSettings, open_image
from tests.pictures import display_p3, encode, exif_rotated, photo_like, quadrants

LIMITS = ImageLimits(max_bytes=8_000_000, max_pixels=4_000_000)
SIZE = (64, 48)


def pillow_decode_jpeg(files: list[torch.Tensor]) -> list[torch.Tensor]:
    """decode_jpeg's contract (1-D uint8 in, [3, h, w] RGB out, an error for a bad file) done by Pillow."""
    decoded = []
    for data in files:
        image = Image.open(io.BytesIO(data.numpy().tobytes()))
        if image.format not in ("JPEG", "MPO"):
            raise RuntimeError("not a JPEG")
        decoded.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1))
    return decoded


def make(decode_jpeg=pillow_decode_jpeg) -> GpuJpegDecoder:
    return GpuJpegDecoder(torch.device("cpu"), SIZE, Image.Resampling.BILINEAR, LIMITS, decode_jpeg=decode_jpeg)


def on_cpu(data: bytes, name: str):
    """The CPU path as the runner runs it: decode, then Pillow's resize."""
    image = open_image(data, LIMITS, name, fit=SIZE)
    return ("cpu", np.asarray(image.resize(SIZE, Image.Resampling.BILINEAR), dtype=np.int16))


def prepare(decoder: GpuJpegDecoder, files: list[bytes]):
    with ThreadPoolExecutor(2) as pool:
        names = [f"images[{i}]" for i in range(len(files))]
        return asyncio.run(decoder.prepare(files, names, pool, on_cpu))


def as_array(pixels: torch.Tensor) -> np.ndarray:
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 3, SIZE[1], SIZE[0])
    return pixels[0].permute(1, 2, 0).numpy().astype(np.int16)


def test_the_switch():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert gpu_decode_on("1", cuda) and not gpu_decode_on("0", cuda)
    assert not gpu_decode_on("auto", cuda)  # not measured faster yet: off until bench/gpu_siglip.py says so
    assert not gpu_decode_on("auto", cpu)
    with pytest.raises(ModelLoadError, match="CUDA"):
        gpu_decode_on("1", cpu)


def test_the_setting_is_checked_at_start_up(monkeypatch):
    spec = SERVICES["siglip2_embed"]
    monkeypatch.setenv(f"{spec.env_prefix}_GPU_DECODE", "on")
    assert ImageSettings.from_env(spec).gpu_decode == "1"
    monkeypatch.setenv(f"{spec.env_prefix}_GPU_DECODE", "sometimes")
    with pytest.raises(ModelLoadError, match="GPU_DECODE"):
        ImageSettings.from_env(spec)


@pytest.mark.parametrize("turn", range(1, 9))
def test_the_turns_on_the_device_are_pillows(turn):
    stored = quadrants(10, 6)
    expected = stored.transpose(UPRIGHT[turn]) if turn in UPRIGHT else stored
    turned = _upright(torch.from_numpy(np.asarray(stored).copy()).permute(2, 0, 1), turn)
    assert np.array_equal(turned.permute(1, 2, 0).numpy(), np.asarray(expected))


def test_only_plain_jpegs_go_to_the_gpu():
    decoder = make()
    picture = photo_like(320, 240)
    assert decoder.takes(encode(picture, "JPEG"), "image") == 1
    assert decoder.takes(exif_rotated(picture, "JPEG", 6), "image") == 6
    assert decoder.takes(encode(picture.convert("L"), "JPEG"), "image") == 1
    assert decoder.takes(encode(picture, "PNG"), "image") is None
    assert decoder.takes(encode(picture.convert("CMYK"), "JPEG"), "image") is None
    assert decoder.takes(encode(picture, "JPEG", icc_profile=display_p3()), "image") is None
    with pytest.raises(InputError) as caught:  # the header checks are the CPU path's, before the GPU
        decoder.takes(b"not an image", "image")
    assert caught.value.kind == "bad_input"


def test_a_mixed_request_matches_the_cpu_path_and_falls_back_per_image():
    picture = photo_like(640, 480, seed=3)
    files = [
        exif_rotated(picture, "JPEG", 6),
        encode(picture, "PNG"),
        encode(picture.convert("CMYK"), "JPEG"),
        encode(picture, "JPEG", quality=90, progressive=True),
    ]
    calls = []

    def counting(batch):
        calls.append(len(batch))
        return pillow_decode_jpeg(batch)

    results = prepare(make(counting), files)
    assert calls == [2]  # the two plain JPEGs, in one batch
    for index in (0, 3):
        cpu = on_cpu(files[index], "x")[1]
        assert np.abs(as_array(results[index]) - cpu).mean() < 2.0  # upright and resized as on the CPU
    assert [r[0] for r in (results[1], results[2])] == ["cpu", "cpu"]


def test_a_file_the_gpu_cannot_decode_gets_the_cpu_paths_400():
    good = encode(photo_like(320, 240), "JPEG")
    broken = good[: len(good) // 3]  # the header is whole: it goes to the GPU, which fails on it
    results_or_error = None
    with pytest.raises(InputError) as caught:
        results_or_error = prepare(make(), [good, broken])
    assert results_or_error is None
    assert (
        caught.value.param == "images[1]" and caught.value.kind == "bad_input" and "truncated" in caught.value.message
    )
