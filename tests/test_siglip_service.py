"""The SigLIP2 service over HTTP: a real `bentoml serve` process, multipart and JSON, and every bad input."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import serve
from tests.pictures import animated_gif, encode, exif_rotated, png_claiming, quadrants, transparent_rgba
from tests.references import SIGLIP_TEXTS as TEXTS
from tests.references import close, reference_images, reference_texts

MAX_IMAGE_BYTES = 300_000
MAX_IMAGES = 4
JSON = "application/json"

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def server(siglip_dir, tmp_path_factory):
    env = {
        "SIGLIP2_EMBED_MODEL": str(siglip_dir),
        "SIGLIP2_EMBED_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "SIGLIP2_EMBED_MAX_IMAGE_PIXELS": "4000000",
        "SIGLIP2_EMBED_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
        "SIGLIP2_EMBED_MAX_ITEMS_PER_REQUEST": "8",
    }
    yield from serve("Siglip2Embed", env, tmp_path_factory.mktemp("logs") / "siglip2.log")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def noise(seed: int, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


PICTURES = [quadrants(), noise(1), noise(2, (64, 64))]
FILES = [encode(picture, "PNG") for picture in PICTURES]


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def test_health(server):
    body = ok(server.get("/health"))
    assert body["status"] == "ok" and body["service"] == "siglip2_embed"
    assert body["dimension"] == 32 and body["device"] == "cpu" and body["dtype"] == "float32"
    assert body["max_image_bytes"] == MAX_IMAGE_BYTES and body["max_images_per_request"] == MAX_IMAGES
    assert body["max_length"] == 64 and abs(body["bias"] + 1.5) < 1e-6


def test_one_image_multipart_and_base64_give_the_same_vector(server, siglip_dir):
    multipart = ok(server.post("/embed/image", files={"image": ("cat.png", FILES[0], "image/png")}))
    plain = ok(server.post("/embed/image", json={"image": b64(FILES[0])}))
    data_uri = ok(server.post("/embed/image", json={"image": f"data:image/png;base64,{b64(FILES[0])}"}))
    form_text = ok(server.post("/embed/image", data={"image": b64(FILES[0])}))  # base64 in a plain form field
    assert multipart["dimension"] == 32
    assert multipart["embedding"] == plain["embedding"] == data_uri["embedding"] == form_text["embedding"]
    assert close(torch.tensor([multipart["embedding"]]), reference_images(siglip_dir, PICTURES[:1]))


def test_several_images_in_input_order(server, siglip_dir):
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(FILES)]
    multipart = ok(server.post("/embed/images", files=files))
    as_json = ok(server.post("/embed/images", json={"images": [b64(data) for data in FILES]}))
    assert multipart["embeddings"] == as_json["embeddings"]
    assert close(torch.tensor(multipart["embeddings"]), reference_images(siglip_dir, PICTURES))


def test_real_world_images_over_http(server, siglip_dir):
    upright = quadrants()
    sent = {
        "exif.jpg": exif_rotated(upright, "JPEG", 6),
        "exif.png": exif_rotated(upright, "PNG", 8),
        "anim.gif": animated_gif(),
        "rgba.png": encode(transparent_rgba(), "PNG"),
        "pic.webp": encode(upright, "WEBP", lossless=True),
        "pic.bmp": encode(upright, "BMP"),
        "pic.tiff": encode(upright, "TIFF"),
    }
    vectors = {}
    for name, data in sent.items():
        vectors[name] = torch.tensor(ok(server.post("/embed/image", files={"image": (name, data)}))["embedding"])
    upright_vector = reference_images(siglip_dir, [upright])[0]
    for name in ("exif.png", "pic.webp", "pic.bmp", "pic.tiff"):
        assert close(vectors[name], upright_vector), name
    assert float(vectors["exif.jpg"] @ upright_vector) > 0.99  # JPEG loses a little, but it stands upright
    red = reference_images(siglip_dir, [Image.new("RGB", (16, 16), (255, 0, 0))])[0]
    assert close(vectors["anim.gif"], red)  # the first frame


def test_text_endpoints(server, siglip_dir):
    one = ok(server.post("/embed/text", json={"text": TEXTS[1]}))
    many = ok(server.post("/embed/texts", json={"texts": TEXTS}))
    expected = reference_texts(siglip_dir, TEXTS)
    assert close(torch.tensor([one["embedding"]]), expected[1:2])
    assert close(torch.tensor(many["embeddings"]), expected) and many["dimension"] == 32


def test_similarity_json_and_multipart(server, siglip_dir):
    text = "a red square"
    as_json = ok(server.post("/similarity", json={"text": text, "images": [b64(data) for data in FILES]}))
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(FILES)]
    multipart = ok(server.post("/similarity", data={"text": text}, files=files))
    # The same answer either way, to float noise: the queue may group the images into passes differently.
    assert [s["index"] for s in as_json["scores"]] == [s["index"] for s in multipart["scores"]]
    assert (as_json["scale"], as_json["bias"]) == (multipart["scale"], multipart["bias"])
    assert close(
        torch.tensor([s["cosine"] for s in as_json["scores"]]), torch.tensor([s["cosine"] for s in multipart["scores"]])
    )
    cosines = reference_images(siglip_dir, PICTURES) @ reference_texts(siglip_dir, [text])[0]
    scale, bias = as_json["scale"], as_json["bias"]
    assert [score["index"] for score in as_json["scores"]] == [0, 1, 2]
    assert close([score["cosine"] for score in as_json["scores"]], cosines)
    assert close([score["score"] for score in as_json["scores"]], torch.sigmoid(cosines * scale + bias))


def test_openapi_still_renders(server):
    spec = ok(server.get("/docs.json"))
    assert "/embed/image" in spec["paths"] and "/similarity" in spec["paths"]


# -- bad input: a 4xx with a JSON error, and the next good request still succeeds ---------------------

TRUNCATED = FILES[2][: len(FILES[2]) // 2]
BOMB = encode(Image.new("L", (2500, 2500)), "PNG")  # 6.25 megapixels in a few kilobytes
HUGE = b"BM" + bytes(MAX_IMAGE_BYTES + 10)


def as_file(data: bytes, field: str = "image") -> dict:
    return {"files": {field: ("upload.bin", data, "application/octet-stream")}}


BAD_REQUESTS = {
    "corrupt upload": ("/embed/image", as_file(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20), 400),
    "truncated upload": ("/embed/image", as_file(TRUNCATED), 400),
    "truncated base64": ("/embed/image", {"json": {"image": b64(TRUNCATED)}}, 400),
    "not an image": ("/embed/image", as_file(b"just some text, not a picture"), 400),
    "not an image (base64)": ("/embed/image", {"json": {"image": b64(b"%PDF-1.4 not a picture")}}, 400),
    "invalid base64": ("/embed/image", {"json": {"image": "%%% not base64 %%%"}}, 400),
    "a URL": ("/embed/image", {"json": {"image": "https://example.com/cat.jpg"}}, 400),
    "empty upload": ("/embed/image", as_file(b""), 400),
    "empty base64": ("/embed/image", {"json": {"image": ""}}, 400),
    "decompression bomb": ("/embed/image", as_file(BOMB), 413),  # over our cap (4 MP): refused by our check
    "bomb header": ("/embed/image", {"json": {"image": b64(png_claiming(30_000, 30_000))}}, 413),  # and Pillow's
    "over the size limit": ("/embed/image", as_file(HUGE), 413),
    "over the size limit (base64)": ("/embed/image", {"json": {"image": b64(HUGE)}}, 413),
    "too many images": ("/embed/images", {"json": {"images": [b64(FILES[0])] * (MAX_IMAGES + 1)}}, 413),
    "too many uploads": (
        "/embed/images",
        {"files": [("images", ("a.png", FILES[0], "image/png"))] * (MAX_IMAGES + 1)},
        413,
    ),
    "no images": ("/embed/images", {"json": {"images": []}}, 400),
    "one bad image among good": ("/embed/images", {"json": {"images": [b64(FILES[0]), "!!", b64(FILES[1])]}}, 400),
    "two files for one image": (
        "/embed/image",
        {"files": [("image", ("a.png", FILES[0])), ("image", ("b.png", FILES[1]))]},
        400,
    ),
    "missing field (JSON)": ("/embed/image", {"json": {"picture": b64(FILES[0])}}, 400),
    "missing field (multipart)": ("/embed/image", as_file(FILES[0], field="picture"), 400),
    "unknown field (JSON)": ("/embed/image", {"json": {"image": b64(FILES[0]), "dimension": 32}}, 400),
    "unknown field (multipart)": ("/embed/image", {**as_file(FILES[0]), "data": {"normalize": "false"}}, 400),
    "wrong type": ("/embed/image", {"json": {"image": 5}}, 400),
    "wrong type in list": ("/embed/images", {"json": {"images": [b64(FILES[0]), 5]}}, 400),
    "malformed JSON": ("/embed/image", {"content": b'{"image": ', "headers": {"content-type": JSON}}, 400),
    "malformed multipart": (
        "/embed/image",
        {"content": b"--x\r\nnonsense", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        400,
    ),
    "form field over the part limit": ("/embed/image", {"data": {"image": "A" * 500_000}}, 400),
    "multipart field over the part limit": (
        "/embed/image",
        {"data": {"image": "A" * 500_000}, "files": {"other": ("a.png", FILES[0])}},
        400,
    ),
    "body over the request limit": ("/embed/image", {"json": {"image": "A" * 3_000_000}}, 413),
    "empty text": ("/embed/text", {"json": {"text": "  "}}, 400),
    "too many texts": ("/embed/texts", {"json": {"texts": ["a"] * 9}}, 413),
    "similarity without text": ("/similarity", {"json": {"text": "", "images": [b64(FILES[0])]}}, 400),
    "similarity with a bad image": ("/similarity", {"json": {"text": "a cat", "images": ["nope"]}}, 400),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_json_4xx_and_the_service_keeps_serving(server, case):
    path, request, status = BAD_REQUESTS[case]
    response = server.post(path, **request)
    assert response.status_code == status, f"{case}: {response.status_code} {response.text[:300]}"
    body = json.loads(response.text)
    assert isinstance(body, dict) and body.get("error"), body
    assert len(ok(server.post("/embed/image", json={"image": b64(FILES[0])}))["embedding"]) == 32


def test_a_misspelt_field_is_named_in_the_error_not_dropped(server):
    for request in (
        {"json": {"image": b64(FILES[0]), "dimension": 32}},
        {**as_file(FILES[0]), "data": {"dimension": "32"}},
    ):
        response = server.post("/embed/image", **request)
        assert response.status_code == 400 and "dimension" in response.text, response.text[:300]


def test_an_oversized_body_is_refused_before_it_is_parsed(server):
    # 4 images of at most 300 kB, in base64, fit in about 2.6 MB; this body is 3 MB.
    response = server.post("/embed/images", json={"images": ["A" * 3_000_000]})
    assert response.status_code == 413 and "request body" in response.json()["error"]
