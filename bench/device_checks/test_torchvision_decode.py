"""Checks that need what only the GPU machine has (torchvision, CUDA); bench/gpu_session.sh runs them there with
`python -m pytest -q -o addopts= bench/device_checks`. Not part of the README's test command, which has neither."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from runners.gpu_decode import GpuJpegDecoder
from tests.pictures import encode, exif_rotated, photo_like
from tests.test_gpu_decode import LIMITS, SIZE, as_array, on_cpu, prepare


def test_with_torchvision_decode_jpeg():
    """torchvision's own decode_jpeg (its CPU build here; the GPU build runs nvJPEG with the same contract)."""
    import torchvision.io as io_module

    decoder = GpuJpegDecoder(torch.device("cpu"), SIZE, Image.Resampling.BILINEAR, LIMITS)
    picture = photo_like(640, 480, seed=4)
    files = [exif_rotated(picture, "JPEG", 8), encode(picture, "JPEG", quality=85)]
    results = prepare(decoder, files)
    for data, result in zip(files, results, strict=True):
        assert np.abs(as_array(result) - on_cpu(data, "x")[1]).mean() < 2.0
    assert io_module.decode_jpeg is not None
