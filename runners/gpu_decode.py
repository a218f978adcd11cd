"""JPEG decoding on the GPU: nvJPEG through torchvision.io.decode_jpeg(device="cuda"), a batch at a time,
then the turn to upright and the resize to the model's input on the device.

Only what it decodes exactly as the CPU path does goes this way: baseline or progressive JPEG (MPO
included) in YCbCr or grey, without a colour profile that changes anything. Everything else (other
formats, CMYK, a Display P3 JPEG, a file nvJPEG refuses) takes the CPU path, image by image, and gets
the same pictures and the same 4xx. Every header is still read on the CPU first, so the size and pixel
caps hold before anything reaches the GPU.

torchvision is imported only when GPU decoding is switched on: the CPU path never needs it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import torch
from PIL import Image

from embed_core.errors import ModelLoadError

from . import images
from .images import ImageLimits, ImageSettings, bytes_from_base64, open_header, orientation

log = logging.getLogger(__name__)

# Pillow's resampling filter -> torch's, with antialias=True the same filters as Pillow's when shrinking.
_MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}


def gpu_decode_on(choice: str, device: torch.device) -> bool:
    """SIGLIP2_EMBED_GPU_DECODE: 1 on (CUDA only), 0 off, auto: off for now everywhere. On CUDA it is to
    become on by default once bench/gpu_siglip.py measures it faster end to end; it has not been measured."""
    if choice == "1" and device.type != "cuda":
        raise ModelLoadError(f"GPU_DECODE=1 needs a CUDA device; this service runs on {device}")
    return choice == "1"


def _upright(image: torch.Tensor, turn: int) -> torch.Tensor:
    """[3, h, w] as stored -> upright: the same turns as images.UPRIGHT (Pillow's transposes)."""
    if turn == 2:
        return image.flip(-1)
    if turn == 3:
        return image.flip(-1, -2)
    if turn == 4:
        return image.flip(-2)
    if turn == 5:
        return image.transpose(-1, -2)
    if turn == 6:
        return torch.rot90(image, k=-1, dims=(-2, -1))
    if turn == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if turn == 8:
        return torch.rot90(image, k=1, dims=(-2, -1))
    return image


class GpuJpegDecoder:
    """Decodes the JPEGs of a request in one nvJPEG batch and returns uint8 [1, 3, height, width] on the
    device; `decode_jpeg` (a list of 1-D uint8 tensors -> a list of [3, h, w] tensors) is torchvision's
    unless given (the tests give one)."""

    def __init__(
        self,
        device: torch.device,
        size: tuple[int, int],
        resample: int,
        limits: ImageLimits,
        decode_jpeg: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    ) -> None:
        if resample not in _MODES:
            raise ModelLoadError(f"GPU decoding resizes bilinear or bicubic; this processor resamples with {resample}")
        self.device = device
        self.width, self.height = size
        self.mode = _MODES[Image.Resampling(resample)]
        self.limits = limits
        self._decode_jpeg = decode_jpeg or self._torchvision(device)

    @classmethod
    def for_service(cls, settings: ImageSettings, device: torch.device, fixed_size: Any) -> GpuJpegDecoder | None:
        """The decoder when the setting and the device call for one, else None (the CPU path)."""
        if not gpu_decode_on(settings.gpu_decode, device):
            return None
        if fixed_size is None:
            raise ModelLoadError("GPU_DECODE=1 needs a fixed-size image processor (resize, rescale, normalize)")
        return cls(device, (fixed_size.width, fixed_size.height), fixed_size.resample, settings.limits)

    @staticmethod
    def _torchvision(device: torch.device) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except Exception as exc:  # not installed, or built for another torch
            raise ModelLoadError(
                f"GPU_DECODE=1 needs torchvision (for nvJPEG), which could not be imported ({exc})"
            ) from None
        return lambda data: decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    # -- the CPU side: headers --------------------------------------------------------------------------

    def takes(self, data: bytes, param: str) -> int | None:
        """The EXIF orientation when the GPU decodes this file as the CPU path would, else None. Refuses
        (InputError) what the CPU path refuses from the header: empty, too big, not an image."""
        image = open_header(data, self.limits, param)
        if image.format not in ("JPEG", "MPO") or image.mode not in ("RGB", "L"):
            return None  # other formats, CMYK
        icc = image.info.get("icc_profile")
        if icc and images._srgb_transform(bytes(icc)) is not None:
            return None  # a profile that changes the colours: the CPU path converts it
        return orientation(image, param)

    # -- the device side ------------------------------------------------------------------------------

    def decode(self, files: Sequence[bytes], turns: Sequence[int]) -> list[torch.Tensor | None]:
        """One batch; None for a file nvJPEG could not decode (the CPU path then says why)."""
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
        try:
            decoded: list[torch.Tensor | None] = list(self._decode_jpeg(encoded))
        except Exception:  # one bad file fails the whole batch: find it, one by one
            decoded = [self._decode_one(data) for data in encoded]
        return [
            None if image is None else self._resize(_upright(image, turn))
            for image, turn in zip(decoded, turns, strict=True)
        ]

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return self._decode_jpeg([data])[0]
        except Exception:
            return None

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        resized = torch.nn.functional.interpolate(
            image.unsqueeze(0).float(), size=(self.height, self.width), mode=self.mode, antialias=True
        )
        return resized.round_().clamp_(0, 255).to(torch.uint8)

    # -- a request --------------------------------------------------------------------------------------

    async def prepare(
        self, sources: Sequence[bytes | str], names: Sequence[str], executor: Executor, on_cpu: Callable[..., Any]
    ) -> list[Any]:
        """Each image as uint8 pixels on the device, or what on_cpu(data, name) made of it; the first bad
        image by position fails the request, as on the CPU path."""
        loop = asyncio.get_running_loop()
        headers = await asyncio.gather(
            *(
                loop.run_in_executor(executor, self._header, source, name)
                for source, name in zip(sources, names, strict=True)
            ),
            return_exceptions=True,
        )
        results: list[Any] = list(headers)
        on_gpu = [i for i, found in enumerate(headers) if not isinstance(found, BaseException) and found[1] is not None]
        if on_gpu:
            files = [headers[i][0] for i in on_gpu]  # type: ignore[index]
            turns = [headers[i][1] for i in on_gpu]  # type: ignore[index]
            for i, pixels in zip(on_gpu, await loop.run_in_executor(executor, self.decode, files, turns), strict=True):
                results[i] = pixels if pixels is not None else headers[i]
        to_cpu = [i for i, result in enumerate(results) if isinstance(result, tuple)]
        done = await asyncio.gather(
            *(loop.run_in_executor(executor, on_cpu, results[i][0], names[i]) for i in to_cpu),
            return_exceptions=True,
        )
        for i, result in zip(to_cpu, done, strict=True):
            results[i] = result
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def _header(self, source: bytes | str, name: str) -> tuple[bytes, int | None]:
        data = bytes_from_base64(source, self.limits, name) if isinstance(source, str) else source
        return data, self.takes(data, name)
