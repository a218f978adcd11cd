"""Turning the bytes people send into an RGB picture, or a clear InputError.

Photos come as JPEG (often MPO from phones), PNG, WebP, GIF, BMP or TIFF; with an EXIF orientation
tag; with transparency; in CMYK or 16-bit grey. Every one of them leaves here as an upright RGB
image, or as an InputError that says what is wrong. The pixel count is checked from the header,
before anything is decoded, so a small file that unpacks to gigabytes is refused cheaply.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .config import int_setting
from .errors import InputError
from .table import ServiceSpec

log = logging.getLogger(__name__)

# Pillow's JPEG opener also takes the MPO files many phones write (a JPEG with extra preview frames).
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF"
# Where transparent pixels end up: white, the way a viewer shows a transparent PNG on a page.
BACKGROUND = (255, 255, 255)
_BASE64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_")


@dataclass(frozen=True)
class ImageLimits:
    """What one image may be: its encoded size and its decoded pixel count."""

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 120_000_000  # above a 102-megapixel medium-format photo; 360 MB once decoded

    @classmethod
    def from_env(cls, spec: ServiceSpec) -> ImageLimits:
        return cls(
            max_bytes=int_setting(spec, "MAX_IMAGE_BYTES", cls.max_bytes),
            max_pixels=int_setting(spec, "MAX_IMAGE_PIXELS", cls.max_pixels),
        )

    def apply_to_pillow(self) -> None:
        """Pillow's own bomb guard (warn above MAX_IMAGE_PIXELS, refuse above twice that) follows our cap.

        The real check is ours (`open_image` refuses anything above max_pixels before decoding); this
        only keeps Pillow's guard from being looser than ours anywhere it applies on its own.
        """
        Image.MAX_IMAGE_PIXELS = self.max_pixels
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files are errors, never half-grey pictures


@dataclass(frozen=True)
class ImageSettings:
    """What the image service takes. Read from the environment alone, so that the HTTP layer can size its
    request limits before any model is loaded."""

    limits: ImageLimits
    max_images_per_request: int
    max_batch_images: int  # images in one forward pass
    decode_threads: int

    @classmethod
    def from_env(cls, spec: ServiceSpec) -> ImageSettings:
        return cls(
            limits=ImageLimits.from_env(spec),
            max_images_per_request=int_setting(spec, "MAX_IMAGES_PER_REQUEST", 64),
            max_batch_images=int_setting(spec, "MAX_BATCH_IMAGES", 32),
            decode_threads=int_setting(spec, "DECODE_THREADS", min(8, os.cpu_count() or 1)),
        )


def bytes_from_base64(text: str, limits: ImageLimits, param: str) -> bytes:
    """Plain base64 (standard or URL-safe, padding optional, line breaks allowed) or a `data:` URI."""
    payload = text.strip()
    if payload.startswith(("http://", "https://")):
        raise InputError(f"`{param}` looks like a URL; URLs are not fetched: send the image bytes", param=param)
    if payload[:5].lower() == "data:":
        header, comma, payload = payload.partition(",")
        if not comma:
            raise InputError(f"`{param}` is a data: URI without a comma before its data", param=param)
        if ";base64" not in header.lower():
            raise InputError(
                f"`{param}` is a data: URI that is not base64-encoded; use data:image/...;base64,<data>", param=param
            )
    payload = "".join(payload.split())  # MIME-style base64 breaks lines
    if not payload:
        raise InputError(f"`{param}` is empty", param=param)
    if len(payload) * 3 // 4 > limits.max_bytes + 2:
        raise InputError(
            f"`{param}` is about {len(payload) * 3 // 4} bytes; at most {limits.max_bytes} bytes per image",
            status=413,
            param=param,
        )
    raw = payload.encode("ascii", errors="replace")
    if not _BASE64_ALPHABET.issuperset(raw):
        raise InputError(f"`{param}` is not valid base64 (it holds characters outside the alphabet)", param=param)
    raw = raw.rstrip(b"=")
    raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"`{param}` is not valid base64: {exc}", param=param) from None


def open_image(data: bytes, limits: ImageLimits, param: str) -> Image.Image:
    """Decode one image to an upright RGB picture, refusing what is too big, broken or not an image."""
    if not data:
        raise InputError(f"`{param}` is empty", param=param)
    if len(data) > limits.max_bytes:
        raise InputError(
            f"`{param}` is {len(data)} bytes; at most {limits.max_bytes} bytes per image", status=413, param=param
        )
    try:
        # Lazy: reads the header only. The pixel data is decoded by load(), after the size check.
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise InputError(
            f"`{param}` is not an image in a supported format ({FORMAT_NAMES})",
            param=param,
        ) from None
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice Image.MAX_IMAGE_PIXELS
        raise _too_many_pixels(param, f"Pillow's decompression-bomb guard: {exc}", limits) from None
    except Exception as exc:  # a header so broken that Pillow cannot even size the image
        raise InputError(f"`{param}` could not be read as an image: {exc}", param=param) from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise _too_many_pixels(param, f"{width}x{height} = {width * height} pixels", limits)
    try:
        image.load()  # the first frame of an animated GIF / WebP / PNG, the first page of a TIFF
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(param, f"Pillow's decompression-bomb guard: {exc}", limits) from None
    except Exception as exc:  # truncated data, broken streams: any failure here is the file's
        raise InputError(
            f"`{param}` is a {image.format} image that could not be decoded (corrupt or truncated): {exc}",
            param=param,
        ) from None
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # a malformed EXIF block: the pixels are still fine, show them as stored
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", param, exc)
    return to_rgb(image, param)


def _too_many_pixels(param: str, found: str, limits: ImageLimits) -> InputError:
    return InputError(
        f"`{param}` has too many pixels to decode ({found}); at most {limits.max_pixels} pixels per image",
        status=413,
        param=param,
    )


def has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image, param: str = "image") -> Image.Image:
    """Any Pillow mode to RGB: transparency over white, 16-bit scaled down (not clipped), CMYK converted."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(image)
    if has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, P, CMYK (Adobe's inverted CMYK is undone by the JPEG decoder), YCbCr
    except (ValueError, OSError) as exc:
        message = f"`{param}` has colour mode {image.mode}, which cannot be converted to RGB ({exc})"
        raise InputError(message, param=param) from None


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit grey (I;16, or I as some Pillow versions open 16-bit PNG/TIFF) spans 0..65535; float (F)
    spans 0..1, or 0..255 when its values go above 1.

    Pillow's own convert("RGB") clips these at 255, which turns almost every pixel white.
    """
    values = np.asarray(image, dtype=np.float64)
    full_scale = 65535.0
    if image.mode == "F":
        full_scale = 1.0 if values.size and float(values.max()) <= 1.0 else 255.0
    grey = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
