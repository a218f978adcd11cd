"""What a person sees of a search, no service needed: thumbnails upright whatever the EXIF orientation, the
score explained, copies listed (the results page and the terminal's table)."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
from PIL import Image

from embed_client.__main__ import table
from embed_client.html import render, thumbnail_data_uri
from embed_client.search import SearchHit, siglip_match
from runners.images import ORIENTATION
from tests.pictures import encode, exif_rotated, photo_like, quadrants, rgb_array


def thumbnail(path) -> Image.Image:
    uri = thumbnail_data_uri(path)
    assert uri is not None and uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


def heic_rotated(upright: Image.Image) -> bytes:
    """As an iPhone writes it: the pixels stored turned, the container's rotation and the EXIF tag both set."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    return encode(stored, "HEIF", quality=95, exif=exif.tobytes(), enc_params={"preset": "ultrafast"})


@pytest.mark.parametrize(
    ("kind", "orientation"),
    [("JPEG", 6), ("JPEG", 3), ("JPEG", 8), ("PNG", 6), ("HEIC", 6)],
)
def test_an_exif_rotated_photo_gets_an_upright_thumbnail(tmp_path, kind, orientation):
    """A 12-MP camera picture stored turned (the decoder's draft mode reduces it first); the quadrants' colours
    show which way the thumbnail stands."""
    upright = quadrants(4032, 3024)
    data = heic_rotated(upright) if kind == "HEIC" else exif_rotated(upright, kind, orientation)
    path = tmp_path / f"photo.{kind.lower()}"
    path.write_bytes(data)
    shown = thumbnail(path)
    assert shown.size == (320, 240)  # landscape, as the photo is upright
    expected = rgb_array(upright.resize(shown.size, Image.BOX))
    assert np.abs(rgb_array(shown) - expected).mean() < 6


def test_a_thumbnail_of_a_real_size_photo_is_small_and_a_broken_file_is_none(tmp_path):
    (tmp_path / "big.jpg").write_bytes(encode(photo_like(4032, 3024, seed=3), "JPEG", quality=90))
    assert max(thumbnail(tmp_path / "big.jpg").size) == 320
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a picture")
    assert thumbnail_data_uri(tmp_path / "broken.jpg") is None


def test_siglip_match_is_the_models_own_sigmoid():
    scale, bias = 117.33, -12.93  # what google/siglip2-so400m-patch16-512 reports
    assert siglip_match(-bias / scale, scale, bias) == pytest.approx(0.5)
    assert siglip_match(0.2, scale, bias) == pytest.approx(1 / (1 + math.exp(-(0.2 * scale + bias))))
    assert siglip_match(-0.14, scale, bias) < 1e-6  # the cosine the issue saw: no match at all


def hits(by_words: bool) -> list[SearchHit]:
    return [
        SearchHit(
            rank=1,
            score=0.0325,
            path="/p/beach.jpg",
            caption="an orange cat",
            taken_at="2024-07-14T18:30:05",
            match=0.87 if by_words else None,
            image_score=0.19 if by_words else 0.97,
            copies=("/p/beach copy.jpg", "/backup/beach.jpg"),
        ),
        SearchHit(rank=2, score=0.0161, path="/p/forest.png", image_score=0.05, match=0.02 if by_words else None),
    ]


def test_the_results_page_explains_the_score_and_lists_copies():
    page = render(hits(by_words=True), "cats")
    assert "how sure SigLIP2 is that the photo shows your words" in page and "logit scale plus its bias" in page
    assert "match 87%" in page and "match 2%" in page and "2024-07-14" in page
    assert "2 more copies: /p/beach copy.jpg, /backup/beach.jpg" in page
    by_photo = render(hits(by_words=False), "like beach.jpg")
    assert "similarity 0.970" in by_photo and "cosine of the two photos" in by_photo and "match" not in by_photo


def test_the_table_shows_the_match_and_the_copies():
    lines = table(hits(by_words=True)).splitlines()
    assert lines[0].split() == ["rank", "match", "score", "path", "caption"]
    assert "87%" in lines[1] and "/p/beach.jpg (+2 copies)" in lines[1] and "an orange cat" in lines[1]
    assert table(hits(by_words=False)).splitlines()[1].split()[1] == "-"
