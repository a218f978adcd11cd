"""Pictures made with Pillow, in the formats and modes people's photo libraries hold."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)
ORIENTATION = 0x0112  # the EXIF tag


def quadrants(width: int = 48, height: int = 32) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, yellow bottom-right: every rotation looks different."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = RED
    pixels[: height // 2, width // 2 :] = GREEN
    pixels[height // 2 :, : width // 2] = BLUE
    pixels[height // 2 :, width // 2 :] = YELLOW
    return Image.fromarray(pixels)


def encode(image: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def exif_rotated(upright: Image.Image, format: str = "PNG", orientation: int = 6) -> bytes:
    """Stored turned the way a camera writes it, with the EXIF tag that tells a viewer how to turn it back.

    Orientation 6 = "rotate 90° clockwise to display", so the stored pixels are the upright ones turned
    90° counter-clockwise; 3 = 180°; 8 = "rotate 90° counter-clockwise to display".
    """
    stored = {
        6: upright.transpose(Image.Transpose.ROTATE_90),
        3: upright.transpose(Image.Transpose.ROTATE_180),
        8: upright.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    params = {"quality": 95} if format == "JPEG" else {}
    return encode(stored, format, exif=exif, **params)


def transparent_rgba() -> Image.Image:
    """Left third fully transparent (red underneath), middle half-transparent green, right third opaque blue."""
    pixels = np.zeros((30, 30, 4), dtype=np.uint8)
    pixels[:, :10] = (255, 0, 0, 0)
    pixels[:, 10:20] = (0, 255, 0, 128)
    pixels[:, 20:] = (0, 0, 255, 255)
    return Image.fromarray(pixels)


def palette_with_transparency() -> Image.Image:
    """A palette image whose index 0 is transparent (left half) and index 1 is red (right half)."""
    image = Image.new("P", (20, 20), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (10, 0, 20, 20))
    image.info["transparency"] = 0
    return image


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE), Image.new("RGB", (16, 16), GREEN)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def grey16() -> Image.Image:
    """A 16-bit grey ramp 0..65535 (what scanners and medical/astro tools write)."""
    ramp = np.linspace(0, 65535, 64 * 8).round().astype(np.uint16).reshape(8, 64)
    return Image.fromarray(ramp)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is one tiny row: a decompression-bomb header.

    Decoding it would fail as truncated; refusing it for its pixel count proves the check reads the header.
    """
    small = encode(Image.new("L", (1, 1)), "PNG")
    ihdr_start = 8  # after the signature: length(4) type(4) data(13) crc(4)
    data = bytearray(small[ihdr_start + 8 : ihdr_start + 8 + 13])
    data[0:8] = struct.pack(">II", width, height)
    chunk = b"IHDR" + bytes(data)
    patched = small[: ihdr_start + 4] + chunk + struct.pack(">I", zlib.crc32(chunk))
    return patched + small[ihdr_start + 8 + 13 + 4 :]


def rgb_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image, dtype=np.int16)
