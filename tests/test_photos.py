"""The photos people's libraries hold (runners/images.py): HEIC and AVIF, ICC colour profiles, and decoding
no more than the model needs. The real-size (12-MP) pictures are made once per session and shared."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from embed_core.errors import InputError, ModelLoadError
from runners import images
from runners.images import ORIENTATION, ImageLimits, accepted_formats, open_image, to_srgb, usable_cpus
from tests.pictures import (
    ADOBE_CURVE,
    ADOBE_RGB,
    BLUE,
    DISPLAY_P3,
    RED,
    TWELVE_MP,
    WHITE,
    adobe_rgb,
    display_p3,
    encode,
    heif_box_offsets,
    heif_claiming,
    photo_like,
    quadrants,
    rgb_array,
    srgb_curve_decode,
    to_srgb_by_hand,
    transparent_rgba,
)

LIMITS = ImageLimits(max_bytes=32_000_000, max_pixels=20_000_000)
assert images.heif_plugin_error() is None  # registers pillow-heif, whose writer the tests use too
ULTRAFAST = {"preset": "ultrafast"}  # x265's default preset takes minutes on a 12-MP photo
FAST_HEIC = {"quality": 60, "enc_params": ULTRAFAST}
FAST_AVIF = {"quality": 60, "speed": 10}


def decode(data: bytes, limits: ImageLimits = LIMITS, fit=None) -> Image.Image:
    return open_image(data, limits, "image", fit=fit)


def refused(data: bytes, limits: ImageLimits = LIMITS) -> InputError:
    with pytest.raises(InputError) as caught:
        decode(data, limits)
    assert caught.value.param == "image" and "`image`" in caught.value.message
    return caught.value


def with_exif_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def test_the_accepted_formats_are_one_list_with_heic_and_avif():
    assert accepted_formats() == ["JPEG", "HEIC", "AVIF", "PNG", "WebP", "GIF", "BMP", "TIFF"]


def test_decode_threads_default_to_the_usable_cores():
    import os

    assert usable_cpus() == len(os.sched_getaffinity(0))


# -- HEIC ------------------------------------------------------------------------------------------------


def test_heic_decodes_close_to_its_source():
    source = photo_like(480, 360, seed=1)
    decoded = decode(encode(source, "HEIF", enc_params=ULTRAFAST, quality=90))
    assert decoded.mode == "RGB" and decoded.size == source.size
    assert np.abs(rgb_array(decoded) - rgb_array(source)).mean() < 4


def test_heic_rotation_is_applied_exactly_once():
    """pillow-heif writes the EXIF orientation as the container's rotation (irot) and keeps the tag in the
    file's EXIF too: both say "turn 90 degrees clockwise", and the picture must be turned once."""
    upright = quadrants(128, 96)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    data = encode(stored, "HEIF", enc_params=ULTRAFAST, quality=95, exif=with_exif_orientation(6))
    assert heif_box_offsets(data, b"irot")  # the rotation is in the container
    tiff = data.find(b"MM\x00*") if b"MM\x00*" in data else data.find(b"II*\x00")
    file_exif = Image.Exif()
    file_exif.load(data[tiff:])
    assert file_exif[ORIENTATION] == 6  # and in the EXIF block
    decoded = decode(data)
    assert decoded.size == upright.size
    assert np.abs(rgb_array(decoded) - rgb_array(upright)).mean() < 6


def test_multi_image_heic_gives_its_primary_image():
    red, blue = Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 64), BLUE)
    data = encode(red, "HEIF", enc_params=ULTRAFAST, save_all=True, append_images=[blue], primary_index=1)
    decoded = rgb_array(decode(data))
    assert np.abs(decoded - np.array(BLUE)).max() <= 8  # the primary, not the first


def test_transparent_heic_lies_on_white():
    decoded = rgb_array(
        decode(encode(transparent_rgba().resize((60, 60), Image.NEAREST), "HEIF", enc_params=ULTRAFAST, quality=100))
    )
    assert np.abs(decoded[30, 5] - np.array(WHITE)).max() <= 8  # fully transparent: the background
    assert np.abs(decoded[30, 55] - np.array(BLUE)).max() <= 12


def test_sixteen_bit_grey_heic_is_scaled_to_eight_bits():
    ramp = np.linspace(0, 65535, 128).round().astype(np.uint16)
    data = encode(
        Image.fromarray(np.tile(ramp, (64, 1))), "HEIF", enc_params=ULTRAFAST, quality=100
    )  # stored with 10 or 12 bits
    decoded = rgb_array(decode(data))[32, :, 1]
    assert np.abs(decoded - np.round(ramp / 257.0)).max() <= 6 and decoded[-1] > 240  # scaled, not clipped


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_heic_is_a_400(cut):
    data = encode(photo_like(256, 192), "HEIF", enc_params=ULTRAFAST, quality=80)
    assert refused(data[: int(len(data) * cut)]).kind == "bad_input"


def test_corrupt_heic_is_a_400():
    """A broken container (where the pixel data lies). Damage inside the HEVC stream itself is concealed by
    the decoder, as a viewer would show it: no decoder can tell it from a real picture."""
    data = bytearray(encode(photo_like(256, 192), "HEIF", enc_params=ULTRAFAST, quality=80))
    (iloc,) = heif_box_offsets(data, b"iloc")
    data[iloc + 4 : iloc + 40] = b"\xff" * 36
    assert refused(bytes(data)).kind == "bad_input"


def test_heic_bomb_is_refused_from_its_header():
    data = heif_claiming(encode(photo_like(128, 96), "HEIF", enc_params=ULTRAFAST, quality=50), 12_000, 10_000)
    error = refused(data)
    assert error.kind == "too_large" and "12000x10000 = 120000000 pixels" in error.message


def test_heic_without_its_plugin_is_a_415_and_refuses_start_up(monkeypatch):
    data = encode(photo_like(128, 96), "HEIF", enc_params=ULTRAFAST, quality=50)
    monkeypatch.setattr(images, "heif_plugin_error", lambda: "ImportError: No module named 'pillow_heif'")
    error = refused(data)
    assert error.kind == "unsupported_media_type" and "pillow_heif" in error.message and "HEIC" in error.message
    assert "HEIC" not in accepted_formats()
    with pytest.raises(ModelLoadError, match="HEIC/HEIF decoder"):
        LIMITS.apply_to_pillow()


# -- AVIF ------------------------------------------------------------------------------------------------


def test_avif_decodes_close_to_its_source():
    source = photo_like(480, 360, seed=2)
    decoded = decode(encode(source, "AVIF", quality=90))
    assert decoded.mode == "RGB" and decoded.size == source.size
    assert np.abs(rgb_array(decoded) - rgb_array(source)).mean() < 4


def test_avif_rotation_is_applied_exactly_once():
    upright = quadrants(128, 96)
    data = encode(upright.transpose(Image.Transpose.ROTATE_90), "AVIF", quality=95, exif=with_exif_orientation(6))
    assert heif_box_offsets(data, b"irot")
    decoded = decode(data)
    assert decoded.size == upright.size and np.abs(rgb_array(decoded) - rgb_array(upright)).mean() < 6


def test_truncated_avif_is_a_400():
    data = encode(photo_like(256, 192), "AVIF", quality=80)
    assert refused(data[: len(data) // 2]).kind == "bad_input"


# -- colour ----------------------------------------------------------------------------------------------

SATURATED = np.array(
    [[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [200, 100, 50], [30, 160, 220], [250, 250, 250]]],
    dtype=np.uint8,
)


@pytest.mark.parametrize(
    ("profile", "primaries", "curve_decode"),
    [
        (display_p3, DISPLAY_P3, srgb_curve_decode),
        (adobe_rgb, ADOBE_RGB, lambda values: values ** ADOBE_CURVE[0]),
    ],
    ids=["display-p3", "adobe-rgb"],
)
def test_embedded_profile_is_converted_to_srgb(profile, primaries, curve_decode):
    picture = Image.fromarray(np.repeat(np.repeat(SATURATED, 8, axis=0), 8, axis=1))
    decoded = rgb_array(decode(encode(picture, "PNG", icc_profile=profile())))
    by_hand = to_srgb_by_hand(np.asarray(picture), primaries, curve_decode)
    assert np.abs(decoded - by_hand).max() <= 2  # the textbook conversion
    reference = ImageCms.profileToProfile(
        picture, ImageCms.ImageCmsProfile(io.BytesIO(profile())), ImageCms.createProfile("sRGB")
    )
    assert np.abs(decoded - rgb_array(reference)).max() <= 1  # lcms on the whole picture
    assert np.abs(decoded - rgb_array(picture)).max() > 20  # and it did change the colours


def test_p3_heic_is_converted_to_srgb():
    picture = Image.fromarray(np.repeat(np.repeat(SATURATED, 16, axis=0), 16, axis=1))
    decoded = rgb_array(decode(encode(picture, "HEIF", enc_params=ULTRAFAST, quality=100, icc_profile=display_p3())))
    by_hand = to_srgb_by_hand(SATURATED, DISPLAY_P3, srgb_curve_decode)
    assert np.abs(decoded[8::16, 8::16] - by_hand).max() <= 6  # HEVC's chroma subsampling costs a little


def test_no_profile_or_an_srgb_one_leaves_the_pixels_alone():
    picture = photo_like(64, 48)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert np.array_equal(rgb_array(decode(encode(picture, "PNG"))), rgb_array(picture))
    assert np.array_equal(rgb_array(decode(encode(picture, "PNG", icc_profile=srgb))), rgb_array(picture))


def test_a_transform_is_built_once_per_profile():
    images._srgb_transform.cache_clear()
    picture = photo_like(64, 48)
    for _ in range(3):
        decode(encode(picture, "PNG", icc_profile=display_p3()))
        decode(encode(picture, "PNG", icc_profile=adobe_rgb()))
    info = images._srgb_transform.cache_info()
    assert info.misses == 2 and info.hits == 4


def test_a_broken_profile_keeps_the_pixels(caplog):
    picture = photo_like(64, 48)
    with caplog.at_level(logging.WARNING):
        decoded = to_srgb(picture, b"not an ICC profile at all" * 10)
    assert np.array_equal(rgb_array(decoded), rgb_array(picture)) and "ICC profile" in caplog.text


# -- decoding no more than needed (the 12-MP photos) ------------------------------------------------------


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return photo_like(*TWELVE_MP, seed=5)


def test_a_12_mp_jpeg_is_decoded_at_the_smallest_dct_scale_still_as_big_as_the_model_input(photo):
    data = encode(photo, "JPEG", quality=90)
    assert decode(data, fit=(512, 512)).size == (1008, 756)  # 1/4; 1/8 (504 x 378) would be too small
    assert decode(data, fit=(378, 378)).size == (504, 378)
    assert decode(data, fit=(379, 379)).size == (1008, 756)
    assert decode(data, fit=(1024, 1024)).size == (2016, 1512)
    assert decode(data).size == TWELVE_MP


def test_an_exif_rotated_jpeg_is_reduced_in_its_stored_orientation(photo):
    data = encode(photo.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=with_exif_orientation(6))
    # A wide model input; the file stores the photo standing (3024 x 4032): read upright, 1/8 is enough
    # (upright 504 x 378); read as stored, it would not be (378 < 500) and 1/4 would be decoded.
    decoded = decode(data, fit=(500, 300))
    assert decoded.size == (504, 378)
    full = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB").resize(decoded.size, Image.BOX)
    assert np.abs(rgb_array(decoded) - rgb_array(full)).mean() < 3


def test_other_formats_are_reduced_by_whole_blocks_to_no_less_than_twice_the_input(photo):
    data = encode(photo.resize((2560, 1600)), "PNG", compress_level=1)
    decoded = decode(data, fit=(400, 400))
    assert decoded.size == (1280, 800)  # reduce(2): 3 would leave 533 rows, less than twice 400
    full = Image.open(io.BytesIO(data)).convert("RGB").reduce(2)
    assert np.array_equal(rgb_array(decoded), rgb_array(full))
    assert decode(data, fit=(512, 512)).size == (2560, 1600)  # 1600 < 2 x 2 x 512: nothing to gain


# -- the vectors: the fast decode path against the model card's recipe on full-size photos ---------------

MODEL_SIZE = 512  # what siglip2-*-patch16-512 takes: the comparison needs the real input size, not 32 x 32


@pytest.fixture(scope="module")
def siglip512(tmp_path_factory):
    """The tiny random SigLIP with the real checkpoints' image side: 512 x 512 in 16 x 16 patches, and their
    processor (bilinear resize to 512 x 512, rescale, normalize)."""
    from tests.conftest import save_tiny_siglip

    return save_tiny_siglip(tmp_path_factory.mktemp("siglip512"), seed=11, image_size=MODEL_SIZE)


@pytest.fixture(scope="module")
def embedder(siglip512):
    from embed_core.config import RunnerConfig
    from embed_core.table import SERVICES
    from runners.images import ImageSettings
    from runners.siglip import SiglipEmbedder

    spec = SERVICES["siglip2_embed"]
    patch = pytest.MonkeyPatch()
    patch.setenv(spec.model_env, str(siglip512))
    patch.setenv("EMBED_DEVICE", "cpu")
    pillow_limit = Image.MAX_IMAGE_PIXELS
    made = SiglipEmbedder(spec, RunnerConfig.from_env(spec), ImageSettings.from_env(spec))
    assert made.fixed_size is not None and (made.fixed_size.width, made.fixed_size.height) == (512, 512)
    yield made
    made.close()
    patch.undo()
    Image.MAX_IMAGE_PIXELS = pillow_limit


def reference_pixels(embedder, data: bytes):
    """The model card's recipe: the whole picture decoded, turned upright, in sRGB, then the checkpoint's
    own image processor (float pixel_values)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    icc = image.info.get("icc_profile")
    image = ImageOps.exif_transpose(image).convert("RGB")
    if icc:
        image = ImageCms.profileToProfile(
            image, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB")
        )
    return embedder.image_processor(images=[image], return_tensors="pt")["pixel_values"]


def vector(embedder, pixel_values):
    import torch

    from runners.siglip import features

    with torch.inference_mode():
        output = embedder.model.get_image_features(pixel_values=pixel_values.float())
    return torch.nn.functional.normalize(features(output).float(), dim=-1)[0]


PHOTO_FILES = {
    "jpeg-exif-rotated": lambda p: encode(
        p.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=with_exif_orientation(6)
    ),
    "jpeg-progressive": lambda p: encode(p, "JPEG", quality=90, progressive=True),
    "heic-display-p3": lambda p: encode(p, "HEIF", icc_profile=display_p3(), **FAST_HEIC),
    "avif": lambda p: encode(p, "AVIF", **FAST_AVIF),
}


@pytest.fixture(scope="module")
def smooth_photo() -> Image.Image:
    """HEVC and AV1 encoders take minutes on sensor noise at 12 MP: their photo has a quarter of it."""
    return photo_like(*TWELVE_MP, seed=5, noise=1.0)


@pytest.mark.parametrize("kind", list(PHOTO_FILES))
def test_the_fast_decode_path_gives_the_reference_vector_on_12_mp_photos(kind, photo, smooth_photo, embedder):
    source = smooth_photo if kind.startswith(("heic", "avif")) else photo
    data = PHOTO_FILES[kind](source)
    width, height = Image.open(io.BytesIO(data)).size
    assert width * height >= 12_000_000
    served = embedder.prepare_image(data).inputs["pixel_values"]  # uint8, the service's decode path
    assert served.shape == (1, 3, 512, 512)
    reference = reference_pixels(embedder, data)
    fixed = embedder.fixed_size
    reference_levels = (reference * fixed.std[0] + fixed.mean[0]) / fixed.rescale_factor  # back to 0..255
    difference = (served.float() - reference_levels).abs()
    # Levels of 0..255 over the model input (bench/photo_decode.py records them for the whole corpus).
    assert float(difference.mean()) < 1.0 and float(difference.max()) <= 20
    expected = vector(embedder, reference)
    assert float(vector(embedder, fixed.normalize(served)) @ expected) >= 0.999
    if kind == "jpeg-exif-rotated":  # the tolerance catches what matters: the photo on its side is far from it
        assert float(vector(embedder, reference.transpose(2, 3).flip(3)) @ expected) < 0.999
