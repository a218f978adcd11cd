"""Decoding what people upload (runners/images.py): formats, orientation, colour modes, and every refusal."""

from __future__ import annotations

import base64
import io
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from embed_core.errors import InputError
from runners.images import ImageLimits, bytes_from_base64, open_image
from tests.pictures import (
    BLUE,
    RED,
    WHITE,
    animated_gif,
    encode,
    exif_rotated,
    grey16,
    palette_with_transparency,
    png_claiming,
    quadrants,
    rgb_array,
    transparent_rgba,
)

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=1_000_000)


def decode(data: bytes, limits: ImageLimits = LIMITS) -> Image.Image:
    return open_image(data, limits, "image")


@pytest.mark.parametrize(
    ("format", "params"),
    [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"})],
)
def test_lossless_formats_decode_to_the_same_pixels(format, params):
    upright = quadrants()
    decoded = decode(encode(upright, format, **params))
    assert decoded.mode == "RGB" and decoded.size == upright.size
    assert np.array_equal(rgb_array(decoded), rgb_array(upright))


def test_jpeg_decodes_close_to_its_source():
    upright = quadrants()
    decoded = decode(encode(upright, "JPEG", quality=95))
    assert np.abs(rgb_array(decoded) - rgb_array(upright)).mean() < 6


def test_phone_mpo_jpeg_gives_its_main_picture():
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), RED).save(buffer, "MPO", save_all=True, append_images=[Image.new("RGB", (20, 10), BLUE)])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    decoded = rgb_array(decode(buffer.getvalue()))
    assert np.abs(decoded - np.array(RED)).max() <= 3


def test_animated_gif_gives_its_first_frame():
    decoded = decode(animated_gif())
    assert decoded.mode == "RGB" and set(map(tuple, rgb_array(decoded).reshape(-1, 3))) == {RED}


@pytest.mark.parametrize("orientation", [6, 3, 8])
def test_exif_orientation_is_applied(orientation):
    upright = quadrants()
    stored = Image.open(io.BytesIO(exif_rotated(upright, "PNG", orientation)))
    assert stored.size != upright.size or orientation == 3  # the file itself is turned
    decoded = decode(exif_rotated(upright, "PNG", orientation))
    assert np.array_equal(rgb_array(decoded), rgb_array(upright))


def test_exif_orientation_in_a_jpeg():
    upright = quadrants()
    decoded = decode(exif_rotated(upright, "JPEG", 6))
    assert decoded.size == upright.size
    assert np.abs(rgb_array(decoded) - rgb_array(upright)).mean() < 6
    unturned = np.asarray(Image.open(io.BytesIO(exif_rotated(upright, "JPEG", 6))).convert("RGB"))
    assert unturned.shape[:2] == (upright.width, upright.height)  # without the tag it would be sideways


def test_transparency_is_composited_on_white():
    decoded = rgb_array(decode(encode(transparent_rgba(), "PNG")))
    assert tuple(decoded[0, 0]) == WHITE  # fully transparent red: nothing of the red shows
    assert np.abs(decoded[0, 15] - np.array([127, 255, 127])).max() <= 1  # half green over white
    assert tuple(decoded[0, 25]) == BLUE


def test_grey_with_alpha_is_composited_on_white():
    image = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent
    image.paste((0, 255), (2, 0, 4, 4))  # right half: opaque black
    decoded = rgb_array(decode(encode(image, "PNG")))
    assert tuple(decoded[0, 0]) == WHITE and tuple(decoded[0, 3]) == (0, 0, 0)


@pytest.mark.parametrize("format", ["PNG", "GIF"])
def test_palette_transparency_is_composited_on_white(format):
    decoded = rgb_array(decode(encode(palette_with_transparency(), format)))
    assert tuple(decoded[0, 0]) == WHITE and tuple(decoded[0, 15]) == RED


def test_palette_without_transparency():
    image = palette_with_transparency()
    del image.info["transparency"]
    decoded = rgb_array(decode(encode(image, "PNG")))
    assert tuple(decoded[0, 0]) == (0, 0, 0) and tuple(decoded[0, 15]) == RED


@pytest.mark.parametrize("format", ["TIFF", "JPEG"])
def test_cmyk_becomes_the_right_rgb(format):
    image = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # full magenta + yellow = red
    image.paste((255, 0, 0, 0), (8, 0, 16, 8))  # full cyan
    data = encode(image, format, **({"quality": 100} if format == "JPEG" else {}))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = rgb_array(decode(data))
    tolerance = 0 if format == "TIFF" else 8
    assert np.abs(decoded[4, 2] - np.array(RED)).max() <= tolerance
    assert np.abs(decoded[4, 12] - np.array((0, 255, 255))).max() <= tolerance


@pytest.mark.parametrize("format", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(format):
    source = grey16()
    data = encode(source, format)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    decoded = rgb_array(decode(data))
    expected = np.rint(np.asarray(source, dtype=np.float64) / 257.0)
    assert np.array_equal(decoded[..., 0], expected) and np.array_equal(decoded[..., 1], decoded[..., 2])
    assert decoded.min() == 0 and decoded.max() == 255 and len(np.unique(decoded)) > 200  # a ramp, not white


def test_a_mode_i_image_is_read_as_16_bit():
    source = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert source.mode == "I"
    assert rgb_array(decode(encode(source, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]


def test_greyscale_and_bilevel():
    assert tuple(rgb_array(decode(encode(Image.new("L", (3, 3), 200), "PNG")))[0, 0]) == (200, 200, 200)
    assert tuple(rgb_array(decode(encode(Image.new("1", (3, 3), 1), "BMP")))[0, 0]) == WHITE


# -- refusals ---------------------------------------------------------------------------------------


def refused(data: bytes, limits: ImageLimits = LIMITS) -> InputError:
    with pytest.raises(InputError) as caught:
        decode(data, limits)
    assert caught.value.param == "image" and "`image`" in caught.value.message
    return caught.value


def test_empty_bytes():
    assert "empty" in refused(b"").message


@pytest.mark.parametrize("data", [b"hello, this is text", b"%PDF-1.7\n" + b"0" * 100, bytes(range(256)) * 4])
def test_not_an_image(data):
    error = refused(data)
    assert error.kind == "bad_input" and "not an image" in error.message


def test_a_format_outside_the_list_is_refused():
    assert "not an image" in refused(encode(Image.new("RGB", (4, 4)), "PPM")).message


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP", "GIF", "TIFF"])
def test_truncated_files(format):
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), format)
    error = refused(data[: len(data) // 2])
    assert error.kind == "bad_input"


def test_corrupt_png():
    data = bytearray(encode(quadrants(), "PNG"))
    data[60:70] = b"\xff" * 10  # inside the image data: the chunk's CRC no longer matches
    assert refused(bytes(data)).kind == "bad_input"


def test_decompression_bomb_is_refused_from_its_header():
    error = refused(png_claiming(5_000, 5_000))
    assert error.kind == "too_large" and "5000x5000 = 25000000 pixels" in error.message
    # Far above Pillow's own limit, Pillow refuses it while reading the header: still a 413.
    assert "2500000000" in refused(png_claiming(50_000, 50_000)).message


def test_real_bomb_compresses_small_but_is_refused():
    bomb = encode(Image.new("L", (2000, 2000)), "PNG")  # 4 megapixels in a few kilobytes
    assert len(bomb) < 20_000
    assert refused(bomb).kind == "too_large"
    assert decode(bomb, ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=4_000_000)).size == (2000, 2000)


def test_over_the_byte_limit():
    data = encode(quadrants(), "BMP")
    error = refused(data, ImageLimits(max_bytes=len(data) - 1, max_pixels=LIMITS.max_pixels))
    assert error.kind == "too_large" and str(len(data)) in error.message


# -- base64 and data: URIs --------------------------------------------------------------------------


def test_base64_forms_give_the_same_bytes():
    data = encode(quadrants(), "PNG")
    plain = base64.b64encode(data).decode()
    for text in (
        plain,
        plain.rstrip("="),
        base64.urlsafe_b64encode(data).decode(),
        base64.encodebytes(data).decode(),  # with line breaks
        f"data:image/png;base64,{plain}",
        f"DATA:image/png;charset=binary;BASE64,{plain}",
        f"  {plain}\n",
    ):
        assert bytes_from_base64(text, LIMITS, "image") == data


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("data:image/png;base64,", "empty"),
        ("this is not base64!", "not valid base64"),
        ("aGVsbG8gd29ybGQ=aGVsbG8=", "not valid base64"),
        ("A", "not valid base64"),
        ("data:image/png,rawdata", "not base64-encoded"),
        ("data:image/png;base64", "without a comma"),
        ("https://example.com/cat.jpg", "URL"),
        ("一只猫", "not valid base64"),
    ],
)
def test_bad_base64(text, words):
    with pytest.raises(InputError) as caught:
        bytes_from_base64(text, LIMITS, "images[2]")
    assert words in caught.value.message and caught.value.param == "images[2]" and caught.value.kind == "bad_input"


def another_thread_ran_inside(call: Callable[..., Any], *args: Any, times: int = 3) -> bool:
    """Whether this thread ran while another was inside `call(*args)` (called `times` times in a row).

    The switch interval is made so long that the interpreter never takes the GIL from the other thread: this
    one can run before the calls are over only if a call lets go of the GIL. An order of events, not a timing.
    """
    started, finished = threading.Event(), threading.Event()

    def calls() -> None:
        started.set()
        for _ in range(times):
            call(*args)
        finished.set()

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        worker = threading.Thread(target=calls)
        worker.start()  # returns once this thread has the GIL again
        started.wait()
        ran_inside = not finished.is_set()
        worker.join()
    finally:
        sys.setswitchinterval(previous)
    return ran_inside


def test_base64_is_decoded_without_holding_the_gil():
    """The model's thread takes the GIL back after every operation: a decoder that holds it for a whole photo
    stalls the model's round next to it (BENCHMARKS.md). Here another thread gets to run during the decode."""
    limits = ImageLimits(max_bytes=200_000_000, max_pixels=LIMITS.max_pixels)
    text = base64.b64encode(np.random.default_rng(0).bytes(64_000_000)).decode()
    assert another_thread_ran_inside(bytes_from_base64, text, limits, "image")
    # The same check sees the stdlib's decoder hold the GIL from start to end.
    assert not another_thread_ran_inside(base64.b64decode, text)


def test_base64_over_the_byte_limit_is_refused_before_decoding():
    with pytest.raises(InputError) as caught:
        bytes_from_base64("A" * 4_000_000, LIMITS, "image")
    assert caught.value.kind == "too_large"
