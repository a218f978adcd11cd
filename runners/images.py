"""Turning the bytes people send into an upright sRGB picture, or a clear InputError.

Photos come as JPEG (often MPO from phones), HEIC/HEIF (iPhones), AVIF, PNG, WebP, GIF, BMP or TIFF; with
an EXIF orientation tag or a rotation in the HEIF container; with an ICC colour profile (Display P3,
Adobe RGB); with transparency; in CMYK or 16-bit grey. Every one of them leaves here as an upright RGB
image in sRGB, or as an InputError that says what is wrong. The pixel count is checked from the header,
before anything is decoded, so a small file that unpacks to gigabytes is refused cheaply.

When the caller says what size the model takes (`fit`), only what is needed is decoded: a JPEG at the
smallest DCT scale still at least that size (Image.draft), anything else reduced by whole pixel blocks to
no less than it; the model's own resampling then makes the last step.
"""

from __future__ import annotations

import binascii
import functools
import io
import logging
import os
from dataclasses import dataclass

import numpy as np
import pybase64
from PIL import Image, ImageCms, ImageFile, UnidentifiedImageError

from embed_core.config import int_setting, setting
from embed_core.errors import InputError, ModelLoadError
from embed_core.table import ServiceSpec

log = logging.getLogger(__name__)

# The one list of what is accepted: Pillow's format id -> the name people and /health see. Pillow's JPEG
# opener also takes the MPO files many phones write (a JPEG with extra preview frames); AVIF is Pillow's own
# (built into its wheels since 11.3); HEIF is pillow-heif's opener (libheif), registered by heif_plugin_error().
IMAGE_FORMATS = {
    "JPEG": "JPEG",
    "HEIF": "HEIC",
    "AVIF": "AVIF",
    "PNG": "PNG",
    "WEBP": "WebP",
    "GIF": "GIF",
    "BMP": "BMP",
    "TIFF": "TIFF",
}
# The ISO base media brands a HEIC/HEIF file declares in its leading `ftyp` box (AVIF's avif/avis go to Pillow).
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
# Where transparent pixels end up: white, the way a viewer shows a transparent PNG on a page.
BACKGROUND = (255, 255, 255)
ORIENTATION = 0x0112  # the EXIF tag
REDUCING_GAP = 2
# EXIF orientation -> the turn that shows the picture upright (the same table as ImageOps.exif_transpose).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@functools.cache
def heif_plugin_error() -> str | None:
    """Register pillow-heif's HEIF opener once; None when it works, else why not."""
    try:
        import pillow_heif

        # Only the primary image is ever shown: skip reading thumbnails, depth maps and auxiliary images.
        pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
    except Exception as exc:  # ImportError, or a libheif that fails to load
        return f"{type(exc).__name__}: {exc}"
    return None


def accepted_formats() -> list[str]:
    """The formats this process opens (what /health reports): all of IMAGE_FORMATS once HEIF has loaded."""
    heif_missing = heif_plugin_error() is not None
    return [name for pillow, name in IMAGE_FORMATS.items() if not (heif_missing and pillow == "HEIF")]


def _pillow_formats() -> tuple[str, ...]:
    heif_missing = heif_plugin_error() is not None
    return tuple(pillow for pillow in IMAGE_FORMATS if not (heif_missing and pillow == "HEIF"))


def _looks_like_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and (data[8:12] in _HEIF_BRANDS or any(b in data[16:64] for b in _HEIF_BRANDS))


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
        error = heif_plugin_error()
        if error is not None:  # HEIC is every iPhone's default: an image service without it is broken
            raise ModelLoadError(f"the HEIC/HEIF decoder (pillow-heif) could not be loaded ({error})")


@dataclass(frozen=True)
class ImageSettings:
    """What the image service takes. Read from the environment alone, so that the HTTP layer can size its
    request limits before any model is loaded."""

    limits: ImageLimits
    max_images_per_request: int
    max_batch_images: int  # images in one forward pass
    decode_threads: int
    gpu_decode: str = "auto"  # JPEGs decoded on the GPU (runners/gpu_decode.py): auto | 1 | 0

    @classmethod
    def from_env(cls, spec: ServiceSpec) -> ImageSettings:
        gpu_decode = (setting(spec, "GPU_DECODE", "auto") or "auto").lower()
        gpu_decode = {"true": "1", "on": "1", "yes": "1", "false": "0", "off": "0", "no": "0"}.get(
            gpu_decode
        ) or gpu_decode
        if gpu_decode not in ("auto", "1", "0"):
            raise ModelLoadError(f"{spec.env_prefix}_GPU_DECODE={gpu_decode!r} is not one of auto, 1, 0")
        return cls(
            limits=ImageLimits.from_env(spec),
            max_images_per_request=int_setting(spec, "MAX_IMAGES_PER_REQUEST", 64),
            max_batch_images=int_setting(spec, "MAX_BATCH_IMAGES", 32),
            decode_threads=int_setting(spec, "DECODE_THREADS", usable_cpus()),
            gpu_decode=gpu_decode,
        )


def usable_cpus() -> int:
    """The cores this process may run on (its affinity, as a container's cpuset limits it): decoding is the
    CPU-bound step in front of the model, and Pillow releases the GIL while it decodes, so every core helps."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def bytes_from_base64(text: str, limits: ImageLimits, param: str) -> bytes:
    """Plain base64 (standard or URL-safe, padding optional, line breaks allowed) or a `data:` URI.

    Decoded by pybase64, which releases the GIL while it decodes: the stdlib's decoder (and any check done
    byte by byte in Python) holds it for the whole of a 12-MP photo's text, and the model's thread, which
    takes the GIL back after every operation, then waits (BENCHMARKS.md, search while indexing)."""
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
    if not payload:
        raise InputError(f"`{param}` is empty", param=param)
    if len(payload) * 3 // 4 > limits.max_bytes + 2:
        payload = "".join(payload.split())  # line breaks do not count against the limit
        if len(payload) * 3 // 4 > limits.max_bytes + 2:
            raise InputError(
                f"`{param}` is about {len(payload) * 3 // 4} bytes; at most {limits.max_bytes} bytes per image",
                kind="too_large",
                param=param,
            )
    try:
        return pybase64.b64decode(payload, validate=True)  # the usual form, decoded as it is
    except (binascii.Error, ValueError):
        pass
    # Any other accepted form, as strict once normalized (only the normalizing holds the GIL): MIME line breaks
    # removed, URL-safe letters taken as + and / (mixed with them too), padding optional.
    payload = "".join(payload.split())
    if "-" in payload or "_" in payload:
        payload = payload.replace("-", "+").replace("_", "/")
    payload = payload.rstrip("=")
    if not payload:
        raise InputError(f"`{param}` is empty", param=param)
    try:
        return pybase64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"`{param}` is not valid base64: {exc}", param=param) from None


def open_header(data: bytes, limits: ImageLimits, param: str) -> ImageFile.ImageFile:
    """Read the header only, refusing what is too big, not an image, or in no accepted format."""
    if not data:
        raise InputError(f"`{param}` is empty", param=param)
    if len(data) > limits.max_bytes:
        raise InputError(
            f"`{param}` is {len(data)} bytes; at most {limits.max_bytes} bytes per image", kind="too_large", param=param
        )
    try:
        # Lazy: reads the header only. The pixel data is decoded by load(), after the size check.
        image = Image.open(io.BytesIO(data), formats=_pillow_formats())
    except UnidentifiedImageError:
        if _looks_like_heif(data) and heif_plugin_error() is not None:
            raise InputError(
                f"`{param}` is a HEIC/HEIF image, and this server's HEIF decoder is not available "
                f"({heif_plugin_error()}); send JPEG, PNG or another of: {', '.join(accepted_formats())}",
                kind="unsupported_media_type",
                param=param,
            ) from None
        raise InputError(
            f"`{param}` is not an image in a supported format ({', '.join(accepted_formats())})", param=param
        ) from None
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice Image.MAX_IMAGE_PIXELS
        raise _too_many_pixels(param, f"Pillow's decompression-bomb guard: {exc}", limits) from None
    except Exception as exc:  # a header so broken that Pillow cannot even size the image
        raise InputError(f"`{param}` could not be read as an image: {exc}", param=param) from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise _too_many_pixels(param, f"{width}x{height} = {width * height} pixels", limits)
    return image


def orientation(image: Image.Image, param: str) -> int:
    """The EXIF orientation (1..8; 1 = as stored). HEIF's own rotation is applied by libheif while decoding,
    and pillow-heif then sets the EXIF tag to 1; AVIF's is turned into the tag by Pillow: each applies once."""
    try:
        value = int(image.getexif().get(ORIENTATION, 1))
    except Exception as exc:  # a malformed EXIF block: the pixels are still fine, show them as stored
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", param, exc)
        return 1
    return value if value in UPRIGHT else 1


def open_image(data: bytes, limits: ImageLimits, param: str, fit: tuple[int, int] | None = None) -> Image.Image:
    """Decode one image to an upright sRGB RGB picture, refusing what is too big, broken or not an image.

    `fit` (width, height), the size the model takes: decode no more than needed to resize to it well (the
    result is still at least that size in both directions, or the full picture when that is smaller)."""
    image = open_header(data, limits, param)
    is_jpeg = image.format in ("JPEG", "MPO")
    # A JPEG's EXIF sits in its header; a PNG's may follow the pixels, and reading it there decodes them.
    stored_fit = _stored_size(fit, orientation(image, param) if is_jpeg else 1)
    if stored_fit is not None and is_jpeg:
        image.draft(None, stored_fit)  # DCT scaling: 1/2, 1/4 or 1/8, never below stored_fit
    try:
        image.load()  # the first frame of an animated GIF / WebP / PNG, the first page of a TIFF
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(param, f"Pillow's decompression-bomb guard: {exc}", limits) from None
    except Exception as exc:  # truncated data, broken streams: any failure here is the file's
        raise InputError(
            f"`{param}` is a {image.format} image that could not be decoded (corrupt or truncated): {exc}",
            param=param,
        ) from None
    turn = orientation(image, param)
    stored_fit = _stored_size(fit, turn)
    icc = image.info.get("icc_profile")
    picture = to_rgb(image, param)
    if stored_fit is not None:
        # Whole blocks of pixels averaged, cheap, leaving at least twice the size for the final resize to
        # blend (Pillow's reducing_gap=2): a box average to the last pixel aliases thin lines.
        factor = min(picture.width // (REDUCING_GAP * stored_fit[0]), picture.height // (REDUCING_GAP * stored_fit[1]))
        if factor >= 2:
            picture = picture.reduce(factor)
    if turn in UPRIGHT:
        picture = picture.transpose(UPRIGHT[turn])
    return to_srgb(picture, icc, param)


def _stored_size(fit: tuple[int, int] | None, turn: int) -> tuple[int, int] | None:
    """The upright size `fit` as the file stores it: orientations 5..8 turn it by 90 degrees."""
    return None if fit is None else (fit[1], fit[0]) if turn in (5, 6, 7, 8) else fit


def _too_many_pixels(param: str, found: str, limits: ImageLimits) -> InputError:
    return InputError(
        f"`{param}` has too many pixels to decode ({found}); at most {limits.max_pixels} pixels per image",
        kind="too_large",
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


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.lru_cache(maxsize=64)
def _srgb_transform(icc: bytes) -> ImageCms.ImageCmsTransform | None:
    """The RGB -> sRGB transform of one embedded profile, built once per distinct profile (building costs
    more than applying to a model-sized picture). None when the profile is sRGB already, is not an RGB
    profile, or cannot be read."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space.strip() != "RGB":
            return None  # a grey or CMYK profile describes the pixels before to_rgb: nothing to apply now
        transform = ImageCms.buildTransform(profile, _srgb_profile(), "RGB", "RGB")
    except Exception as exc:  # a broken profile: the pixels are still fine, take them as sRGB
        log.warning("ignoring an unreadable ICC profile (%s)", exc)
        return None
    # Many cameras and editors embed an sRGB profile: skip the work when this one changes nothing.
    probe = Image.fromarray(_PROBE_COLOURS)
    moved = np.abs(np.asarray(ImageCms.applyTransform(probe, transform), dtype=np.int16) - _PROBE_COLOURS).max()
    return transform if moved > 1 else None


# Every 15th level of each channel (18**3 colours): enough to tell an sRGB-equivalent profile from another.
_LEVELS = np.arange(0, 256, 15, dtype=np.uint8)
_PROBE_COLOURS = np.stack(np.meshgrid(_LEVELS, _LEVELS, _LEVELS, indexing="ij"), axis=-1).reshape(1, -1, 3)


def to_srgb(image: Image.Image, icc: bytes | None, param: str = "image") -> Image.Image:
    """An RGB picture with its embedded ICC profile -> the same colours in sRGB; no profile means sRGB."""
    transform = _srgb_transform(bytes(icc)) if icc else None
    if transform is None:
        return image
    try:
        return ImageCms.applyTransform(image, transform)
    except Exception as exc:  # lcms refusing this picture: show it as stored rather than fail the request
        log.warning("%s: could not apply its ICC profile (%s)", param, exc)
        return image
