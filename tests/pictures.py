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


# -- real-size photos -----------------------------------------------------------------------------------

TWELVE_MP = (4032, 3024)  # what a phone's main camera writes


def photo_like(width: int, height: int, seed: int = 0, noise: float = 4.0) -> Image.Image:
    """Something a camera could have taken: a smooth sky-to-ground gradient with soft light, solid shapes
    with sharp edges (a sun, a house, a window, a fence), fine stripes and mild sensor noise. Not random
    noise, which no camera makes and which no downscaling path can keep. Drawn with Pillow's C code (a
    12-MP picture in well under a second), the smooth part at a quarter of the size and scaled up."""
    from PIL import ImageChops, ImageDraw

    small_w, small_h = max(width // 4, 2), max(height // 4, 2)
    y = np.linspace(0.0, 1.0, small_h, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, small_w, dtype=np.float32)[None, :]
    horizon = 0.55 + 0.05 * np.sin(x * 6.0 + seed)
    sky = np.stack(np.broadcast_arrays(70 + 90 * y, 120 + 80 * y, 230 - 60 * y + 0 * x), axis=-1)
    ground = np.stack(np.broadcast_arrays(40 + 80 * (y - 0.5) + 0 * x, 110 + 50 * x + 0 * y, 40 + 30 * x), axis=-1)
    smooth = np.where((y < horizon)[..., None], sky, ground)
    smooth *= (0.85 + 0.25 * np.exp(-((x - 0.7) ** 2 + (y - 0.3) ** 2) * 6.0))[..., None]  # soft light
    picture = Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(picture)
    w, h = width, height
    draw.ellipse((0.74 * w, 0.1 * h, 0.74 * w + 0.1 * h, 0.2 * h), fill=(255, 236, 150))  # the sun
    draw.rectangle((0.15 * w, 0.45 * h, 0.4 * w, 0.8 * h), fill=(180, 60, 50))  # a house
    draw.polygon([(0.13 * w, 0.45 * h), (0.275 * w, 0.3 * h), (0.42 * w, 0.45 * h)], fill=(90, 40, 35))
    draw.rectangle((0.2 * w, 0.55 * h, 0.26 * w, 0.65 * h), fill=(250, 250, 235))  # a window
    rng = np.random.default_rng(seed)
    for left in np.arange(0.5, 0.95, 0.004 + 0.002 * rng.random()) * w:  # a fence: thin posts, sharp edges
        draw.line((left, 0.62 * h, left, 0.78 * h), fill=(235, 225, 200), width=max(1, w // 800))
    grain = Image.effect_noise((width, height), noise)  # grey around 128: sensor noise
    return ImageChops.add(picture, Image.merge("RGB", (grain, grain, grain)), scale=1.0, offset=-128)


# -- ICC profiles ----------------------------------------------------------------------------------------
# No Display P3 or Adobe RGB profile ships with Pillow (ImageCms.createProfile makes only sRGB, LAB and XYZ)
# and there is no network here, so the tests write the profile the way the ICC spec (v4.3) lays it out:
# a matrix/TRC display profile, the kind Apple and Adobe ship for these spaces.

D65 = (0.3127, 0.3290)
DISPLAY_P3 = {"red": (0.680, 0.320), "green": (0.265, 0.690), "blue": (0.150, 0.060), "white": D65}
ADOBE_RGB = {"red": (0.64, 0.33), "green": (0.21, 0.71), "blue": (0.15, 0.06), "white": D65}
SRGB_PRIMARIES = {"red": (0.64, 0.33), "green": (0.30, 0.60), "blue": (0.15, 0.06), "white": D65}
SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)  # ICC parametric curve type 3
ADOBE_CURVE = (563 / 256,)  # a pure gamma, type 0


def rgb_to_xyz(primaries: dict) -> np.ndarray:
    """The 3x3 matrix taking linear RGB to XYZ (white Y = 1), from the primaries' and white's xy."""

    def xyz(xy):
        return np.array([xy[0] / xy[1], 1.0, (1 - xy[0] - xy[1]) / xy[1]])

    columns = np.stack([xyz(primaries[name]) for name in ("red", "green", "blue")], axis=1)
    return columns * np.linalg.solve(columns, xyz(primaries["white"]))


def _adapted_to_d50(matrix: np.ndarray) -> np.ndarray:
    """Bradford chromatic adaptation from D65 to the ICC's D50 connection space."""
    bradford = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
    d65, d50 = np.array([0.95047, 1.0, 1.08883]), np.array([0.9642, 1.0, 0.8249])
    scale = np.diag((bradford @ d50) / (bradford @ d65))
    return np.linalg.inv(bradford) @ scale @ bradford @ matrix


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _mluc(text: str) -> bytes:
    encoded = text.encode("utf-16-be")
    return b"mluc" + bytes(4) + struct.pack(">II", 1, 12) + b"enUS" + struct.pack(">II", len(encoded), 28) + encoded


def icc_profile(description: str, primaries: dict, curve: tuple[float, ...]) -> bytes:
    """An ICC v4 RGB display profile: description, D50 white, the three colorants, one tone curve."""
    colorants = _adapted_to_d50(rgb_to_xyz(primaries))
    xyz = {f"{c}XYZ": b"XYZ " + bytes(4) + b"".join(map(_s15, colorants[:, i])) for i, c in enumerate("rgb")}
    para = b"para" + bytes(4) + struct.pack(">HH", {1: 0, 5: 3}[len(curve)], 0) + b"".join(map(_s15, curve))
    tags = {
        "desc": _mluc(description),
        "cprt": _mluc("made in the tests"),
        "wtpt": b"XYZ " + bytes(4) + _s15(0.9642) + _s15(1.0) + _s15(0.8249),
        **xyz,
        "rTRC": para,
        "gTRC": para,
        "bTRC": para,
    }
    table, body = b"", b""
    offset = 128 + 4 + 12 * len(tags)
    for signature, data in tags.items():
        data += bytes(-len(data) % 4)
        table += signature.encode() + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + bytes(4)
        + bytes([4, 0x30, 0, 0])
        + b"mntrRGB XYZ "
        + struct.pack(">6H", 2026, 12, 1, 0, 0, 0)
        + b"acsp"
        + bytes(24)
        + struct.pack(">I", 0)  # rendering intent: perceptual
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
        + bytes(48)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def display_p3() -> bytes:
    return icc_profile("Display P3", DISPLAY_P3, SRGB_CURVE)


def adobe_rgb() -> bytes:
    return icc_profile("Adobe RGB (1998)", ADOBE_RGB, ADOBE_CURVE)


def srgb_curve_decode(values: np.ndarray) -> np.ndarray:
    return np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)


def srgb_curve_encode(values: np.ndarray) -> np.ndarray:
    values = np.clip(values, 0.0, 1.0)
    return np.where(values <= 0.0031308, values * 12.92, 1.055 * values ** (1 / 2.4) - 0.055)


def to_srgb_by_hand(pixels: np.ndarray, primaries: dict, decode) -> np.ndarray:
    """The colourimetry textbook's conversion (linearize, RGB -> XYZ -> sRGB, re-encode, clip), written out
    with numpy: an independent reference for what an ICC transform must give."""
    linear = decode(pixels.astype(np.float64) / 255.0)
    matrix = np.linalg.inv(rgb_to_xyz(SRGB_PRIMARIES)) @ rgb_to_xyz(primaries)
    return np.rint(srgb_curve_encode(linear @ matrix.T) * 255.0).astype(np.int16)


# -- HEIF files ------------------------------------------------------------------------------------------


def heif_box_offsets(data: bytes, box: bytes) -> list[int]:
    """Where a box type occurs in a HEIF file (its 4-byte type, after the 4-byte size)."""
    found, start = [], 0
    while (position := data.find(box, start)) >= 0:
        found.append(position)
        start = position + 1
    return found


def heif_claiming(data: bytes, width: int, height: int) -> bytes:
    """A HEIF file whose every `ispe` (image spatial extents) box claims width x height: a bomb's header."""
    patched = bytearray(data)
    for position in heif_box_offsets(data, b"ispe"):
        patched[position + 8 : position + 16] = struct.pack(">II", width, height)  # after type and version/flags
    return bytes(patched)
