"""The SigLIP2 runner against the model card's recipe, computed independently here with transformers."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embed_core.config import RunnerConfig
from embed_core.errors import InputError
from embed_core.table import SERVICES
from runners.siglip import ImageSettings, SiglipEmbedder
from tests.conftest import HANG_GUARD_SECONDS
from tests.pictures import encode, exif_rotated, quadrants, transparent_rgba
from tests.references import SIGLIP_TEXTS as TEXTS
from tests.references import card_model, close, reference_images, reference_texts

SPEC = SERVICES["siglip2_embed"]


@pytest.fixture
def make_siglip(monkeypatch):
    made: list[SiglipEmbedder] = []

    def make(model: Path, **env: str) -> SiglipEmbedder:
        monkeypatch.setenv(SPEC.model_env, str(model))
        monkeypatch.setenv("EMBED_DEVICE", "cpu")
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        embedder = SiglipEmbedder(SPEC, RunnerConfig.from_env(SPEC), ImageSettings.from_env(SPEC))
        made.append(embedder)
        return embedder

    pillow_limit = Image.MAX_IMAGE_PIXELS
    yield make
    for embedder in made:
        embedder.close()
    Image.MAX_IMAGE_PIXELS = pillow_limit  # the runner sets Pillow's process-wide guard


def pictures() -> list[Image.Image]:
    noise = np.random.default_rng(7).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    return [quadrants(), Image.new("RGB", (40, 40), (30, 160, 90)), Image.fromarray(noise)]


def run(coroutine):
    return asyncio.run(coroutine)


# -- the model card's code, written out independently ----------------------------------------------


# -- embeddings -------------------------------------------------------------------------------------


def test_image_embeddings_match_the_model_card(make_siglip, siglip_dir):
    embedder = make_siglip(siglip_dir)
    images = pictures()
    ours = torch.tensor(run(embedder.embed_images([encode(image, "PNG") for image in images])))
    expected = reference_images(siglip_dir, images)
    assert close(ours, expected)
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(images)), atol=1e-6)
    assert (ours @ ours.T - torch.eye(len(images))).abs().max() < 0.999  # distinct pictures, distinct vectors
    assert embedder.dimension == ours.shape[1] == 32


def test_text_embeddings_match_the_model_card(make_siglip, siglip_dir):
    embedder = make_siglip(siglip_dir)
    ours = torch.tensor(run(embedder.embed_texts(TEXTS)))
    assert close(ours, reference_texts(siglip_dir, TEXTS))
    # Lower-casing matters: this vocabulary, like the real one's training, has no upper-case words.
    assert not close(ours[1], reference_texts(siglip_dir, TEXTS[1:2], lower=False)[0], atol=1e-3)


def test_texts_are_padded_at_the_end_to_exactly_64_tokens(make_siglip, siglip_dir):
    embedder = make_siglip(siglip_dir)
    encoded = embedder._tokenize(["a cat", "a black dog runs on the grass " * 20])
    ids = encoded["input_ids"]
    tokenizer = embedder.tokenizer
    assert ids.shape == (2, 64) and set(encoded) == {"input_ids"}  # like the real tokenizer: no attention mask
    short = ids[0].tolist()
    end = short.index(tokenizer.eos_token_id)
    assert end > 0 and set(short[end + 1 :]) == {tokenizer.pad_token_id}  # right padding after <eos>
    assert tokenizer.bos_token_id not in short
    assert ids[1, -1] == tokenizer.eos_token_id  # a long text is cut, and still ends with <eos>
    long_text = "a black dog runs on the grass " * 20
    expected = reference_texts(siglip_dir, [long_text], truncation=True)
    assert close(torch.tensor(run(embedder.embed_texts([long_text]))), expected)


def test_right_padding_even_when_the_tokenizer_says_left(make_siglip, tmp_path):
    """Gemma's tokenizer class pads on the left by default; SigLIP pools the last position and was trained
    with padding at the end, so a checkpoint whose tokenizer says "left" must still be padded on the right."""
    from tests.conftest import save_tiny_siglip

    left = save_tiny_siglip(tmp_path / "left", padding_side="left")
    embedder = make_siglip(left)
    assert embedder.tokenizer.padding_side == "left"
    ours = torch.tensor(run(embedder.embed_texts(TEXTS)))
    assert close(ours, reference_texts(left, TEXTS, padding_side="right"))
    assert not close(ours, reference_texts(left, TEXTS, padding_side="left"), atol=1e-3)


def test_exif_rotation_turns_the_pixels_fed_to_the_model(make_siglip, siglip_dir):
    embedder = make_siglip(siglip_dir)
    assert embedder.fixed_size is not None  # a fixed-resolution processor: resize in threads, normalize batched
    _, processor = card_model(siglip_dir)
    upright = quadrants()
    data = exif_rotated(upright, "PNG", orientation=6)
    as_stored = Image.open(io.BytesIO(data)).convert("RGB")  # what a decoder that ignores EXIF would see
    fed = embedder.model_inputs([embedder.prepare_image(data)])["pixel_values"]
    # Equal up to float32 rounding: the rescale and normalize run on the device, batched (1 ulp apart).
    assert torch.allclose(fed, processor(images=[upright], return_tensors="pt")["pixel_values"], atol=1e-6, rtol=0)
    assert not torch.allclose(fed, processor(images=[as_stored], return_tensors="pt")["pixel_values"], atol=0.1)
    ours = torch.tensor(run(embedder.embed_images([data])))
    assert close(ours, reference_images(siglip_dir, [upright]))


def test_transparent_pixels_reach_the_model_as_white(make_siglip, siglip_dir):
    embedder = make_siglip(siglip_dir)
    _, processor = card_model(siglip_dir)
    rgba = np.asarray(transparent_rgba(), dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    over_white = np.rint(rgba[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    fed = embedder.model_inputs([embedder.prepare_image(encode(transparent_rgba(), "PNG"))])["pixel_values"]
    expected = processor(images=[Image.fromarray(over_white)], return_tensors="pt")["pixel_values"]
    assert torch.allclose(fed, expected, atol=2 / 255)  # within one 8-bit step of rounding after normalization
    over_black = np.rint(rgba[..., :3] * alpha).astype(np.uint8)
    naive = processor(images=[Image.fromarray(over_black)], return_tensors="pt")["pixel_values"]
    assert not torch.allclose(fed, naive, atol=0.1)


def test_similarity_is_siglips_sigmoid(make_siglip, siglip_dir):
    embedder = make_siglip(siglip_dir)
    images = pictures()
    text = "A Red Square"
    scores = run(embedder.similarity(text, [encode(image, "PNG") for image in images]))
    model, processor = card_model(siglip_dir)
    batch = processor(text=[text.lower()], images=images, padding="max_length", max_length=64, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**batch)  # the model's own forward: logits = cos * exp(logit_scale) + logit_bias
    expected = torch.sigmoid(outputs.logits_per_image[:, 0])
    assert [score["index"] for score in scores] == [0, 1, 2]
    assert close([score["score"] for score in scores], expected)
    cosines = reference_images(siglip_dir, images) @ reference_texts(siglip_dir, [text])[0]
    assert close([score["cosine"] for score in scores], cosines)
    assert abs(embedder.scale - float(model.logit_scale.detach().exp())) < 1e-5 and abs(embedder.bias + 1.5) < 1e-6
    assert len({round(score["score"], 6) for score in scores}) == 3  # the scores are not all one value


def test_concurrent_image_requests_share_forward_passes(make_siglip, siglip_dir):
    embedder = make_siglip(siglip_dir)
    images = [encode(image, "PNG") for image in pictures()]
    alone = torch.tensor(run(embedder.embed_images(images[:1])))[0]
    # The first round waits until every other request is queued (they are decoded in threads first, so they
    # arrive in any order and at any pace): what shares a pass then does not depend on the machine's speed.
    batcher, process, first = embedder.batcher, embedder.batcher._process, threading.Event()
    items = 12 + len(TEXTS)

    def first_waits_for_the_rest(round_items):
        if not first.is_set():
            first.set()
            deadline = time.monotonic() + HANG_GUARD_SECONDS
            while batcher._queued_items + len(round_items) < items:
                assert time.monotonic() < deadline, "the other requests never reached the queue"
                time.sleep(0.005)
        return process(round_items)

    batcher._process = first_waits_for_the_rest

    async def concurrent():
        return await asyncio.gather(
            *(embedder.embed_images([images[i % 3]]) for i in range(12)), embedder.embed_texts(TEXTS)
        )

    before = embedder.batcher.stats.batches
    results = run(concurrent())
    assert embedder.batcher.stats.batches - before < 13, embedder.batcher.stats.batch_sizes
    assert close(torch.tensor(results[3][0]), alone)  # request 3 sent image 0
    assert close(torch.tensor(results[-1]), reference_texts(siglip_dir, TEXTS))


def test_images_are_decoded_in_threads_off_the_event_loop(make_siglip, siglip_dir):
    import threading

    embedder = make_siglip(siglip_dir)
    decoded_in: list[str] = []
    prepare = embedder.prepare_image

    def recording(source, param="image"):
        decoded_in.append(threading.current_thread().name)
        return prepare(source, param)

    embedder.prepare_image = recording
    run(embedder.embed_images([encode(image, "PNG") for image in pictures()]))
    assert len(decoded_in) == 3 and all(name.startswith("siglip2_embed-decode") for name in decoded_in)


def test_micro_batches_do_not_change_vectors(make_siglip, siglip_dir):
    embedder = make_siglip(siglip_dir, SIGLIP2_EMBED_MAX_BATCH_IMAGES="2")
    images = pictures() * 2
    ours = torch.tensor(run(embedder.embed_images([encode(image, "PNG") for image in images])))
    assert close(ours, reference_images(siglip_dir, images))


def test_the_first_bad_image_by_position_fails_the_request(make_siglip, siglip_dir):
    embedder = make_siglip(siglip_dir)
    good = encode(quadrants(), "PNG")
    with pytest.raises(InputError) as caught:
        run(embedder.embed_images([good, b"not an image", good, b""]))
    assert caught.value.param == "images[1]"
    assert len(run(embedder.embed_images([good]))) == 1  # and the runner keeps working


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns, then we refuse
def test_limits_come_from_the_environment(make_siglip, siglip_dir):
    embedder = make_siglip(
        siglip_dir,
        SIGLIP2_EMBED_MAX_IMAGE_BYTES="1000",
        EMBED_MAX_IMAGE_PIXELS="500",
        SIGLIP2_EMBED_MAX_IMAGES_PER_REQUEST="3",
    )
    limits = embedder.settings.limits
    assert (limits.max_bytes, limits.max_pixels, embedder.settings.max_images_per_request) == (1000, 500, 3)
    assert Image.MAX_IMAGE_PIXELS == 500
    with pytest.raises(InputError) as caught:
        embedder.check_image_count(4, "images")
    assert caught.value.kind == "too_large"
    with pytest.raises(InputError) as caught:
        run(embedder.embed_images([encode(Image.new("RGB", (30, 30)), "PNG")]))
    assert caught.value.kind == "too_large" and "900" in caught.value.message


# -- a NaFlex SigLIP2 checkpoint (Siglip2Model, variable resolution) loads through the same Auto classes --


@pytest.fixture(scope="module")
def naflex_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, Siglip2Config, Siglip2ImageProcessor, Siglip2Model

    from tests.conftest import build_siglip2_tokenizer

    directory = tmp_path_factory.mktemp("siglip2-naflex")
    build_siglip2_tokenizer(directory)
    vocab = len(AutoTokenizer.from_pretrained(str(directory)))
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = Siglip2Config(
        text_config=dict(vocab_size=vocab, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, **tower),
        vision_config=dict(num_patches=256, patch_size=16, **tower),  # the real NaFlex checkpoints' values
    )
    torch.manual_seed(4)
    Siglip2Model(config).save_pretrained(str(directory))
    Siglip2ImageProcessor(patch_size=16, max_num_patches=256).save_pretrained(str(directory))
    return directory


def test_naflex_checkpoint(make_siglip, naflex_dir):
    embedder = make_siglip(naflex_dir)
    assert type(embedder.model).__name__ == "Siglip2Model"
    images = [quadrants(), Image.new("RGB", (90, 20), (200, 10, 10))]  # two aspect ratios: two patch grids
    prepared = embedder.prepare_image(encode(images[1], "PNG")).inputs
    assert set(prepared) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}  # the processor's own path
    assert embedder.fixed_size is None
    ours = torch.tensor(run(embedder.embed_images([encode(image, "PNG") for image in images])))
    assert close(ours, reference_images(naflex_dir, images))
    assert close(torch.tensor(run(embedder.embed_texts(TEXTS))), reference_texts(naflex_dir, TEXTS))


def test_compiled_vision_tower_gives_the_same_vectors(make_siglip, siglip_dir, monkeypatch):
    """EMBED_COMPILE=1 (the GPU default, auto) compiles the vision tower at start-up; the vectors do not change."""
    eager = make_siglip(siglip_dir)
    monkeypatch.setenv("EMBED_COMPILE", "1")
    compiled = make_siglip(siglip_dir)
    assert compiled.compiled and not eager.compiled
    data = [encode(quadrants(), "PNG"), encode(Image.new("RGB", (90, 20), (200, 10, 10)), "PNG")]
    assert close(torch.tensor(run(compiled.embed_images(data))), torch.tensor(run(eager.embed_images(data))))
