"""The photo pipeline's pieces that need no server: the walk, captions, metadata, the busy-service pacing."""

from __future__ import annotations

import email.parser
import email.policy
import time

import httpx
import pytest

from bench.index_corpus import camera_exif, jpeg, photo
from embed_client import EmbedClient, ServiceBusy, Unreachable
from embed_client.index import _Limiter, _patiently, extensions_for, load_captions, read_metadata, walk


def test_the_walk_follows_the_services_formats_and_skips_hidden_files(tmp_path):
    for name in ["a.JPG", "b.heic", "c.avif", "d.png", "notes.txt", ".e.jpg", ".cache/f.jpg", "sub/g.webp"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = {path.relative_to(tmp_path).as_posix() for path in walk(tmp_path, extensions_for({}))}
    assert found == {"a.JPG", "b.heic", "c.avif", "d.png", "sub/g.webp"}  # no list in /health: every photo format
    only = extensions_for({"formats": ["JPEG", "PNG"]})
    assert {path.name for path in walk(tmp_path, only)} == {"a.JPG", "d.png"}
    assert ".heic" in extensions_for({"formats": ["HEIF"]}) and ".avif" in extensions_for({"formats": ["AVIF"]})


def test_captions_from_json_and_csv_sidecars_relative_to_the_folder(tmp_path):
    (tmp_path / "c.json").write_text('{"2024/a.jpg": "a cat", "b.jpg": "  "}')
    assert load_captions(tmp_path / "c.json", tmp_path) == {str(tmp_path / "2024" / "a.jpg"): "a cat"}
    (tmp_path / "c.csv").write_text('path,caption\n2024/a.jpg,"a cat, asleep"\n', encoding="utf-8")
    assert load_captions(tmp_path / "c.csv", tmp_path) == {str(tmp_path / "2024" / "a.jpg"): "a cat, asleep"}
    (tmp_path / "bad.csv").write_text("file,text\na.jpg,x\n")
    with pytest.raises(ValueError, match="path` and `caption"):
        load_captions(tmp_path / "bad.csv", tmp_path)


def test_capture_date_and_description_from_exif_or_xmp():
    data = jpeg(photo(1, 640, 480), camera_exif("2021:03:04 05:06:07", "a red kite"))
    assert read_metadata(data) == ("2021-03-04T05:06:07", "a red kite")
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description><dc:description><rdf:Alt>'
        b'<rdf:li xml:lang="x-default">Fish &amp; chips</rdf:li></rdf:Alt></dc:description>'
        b"</rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    assert read_metadata(jpeg(photo(2, 320, 240)) + xmp) == (None, "Fish & chips")
    assert read_metadata(b"not an image") == (None, None)


def test_images_are_uploaded_as_files_in_order_and_sent_again_on_a_retry(tmp_path):
    """Multipart, not base64 JSON (a fraction of the client's CPU per photo); read back here with the
    standard library's MIME parser."""
    first, second = jpeg(photo(1, 640, 480)), jpeg(photo(2, 480, 640))
    (tmp_path / "beach.jpg").write_bytes(second)
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if len(sent) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": "busy"})
        return httpx.Response(200, json={"embeddings": [[1.0, 0.0], [0.0, 1.0]], "dimension": 2})

    with EmbedClient("http://siglip", retries=1, transport=httpx.MockTransport(answer)) as client:
        assert client.embed_images([first, tmp_path / "beach.jpg"]) == [[1.0, 0.0], [0.0, 1.0]]
    assert len(sent) == 2 and parts(sent[0]) == parts(sent[1])
    assert parts(sent[1]) == [("images", "images", first), ("images", "beach.jpg", second)]


def test_retry_after_is_honoured_as_sent_even_zero_and_a_bad_one_falls_back_to_the_backoff(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("embed_client.client.time.sleep", slept.append)
    waits = iter(["0", "2.5", "-3", "nan", "soon"])

    def answer(request: httpx.Request) -> httpx.Response:
        wait = next(waits, None)
        if wait is None:
            return httpx.Response(200, json={"embeddings": [[1.0]], "dimension": 1})
        return httpx.Response(503, headers={"Retry-After": wait}, json={"error": "busy"})

    with EmbedClient("http://bge", retries=5, backoff=0.5, transport=httpx.MockTransport(answer)) as client:
        assert client.embed_texts(["a cat"]) == [[1.0]]
    assert slept == [0.0, 2.5, 0.0, 0.5 * 2**3, 0.5 * 2**4]  # a negative wait is no wait; nan and words: backoff


def test_no_images_are_no_vectors_without_a_request():
    transport = httpx.MockTransport(lambda request: pytest.fail(f"sent {request.method} {request.url}"))
    with EmbedClient("http://siglip", transport=transport) as client:
        assert client.embed_images([]) == []


def parts(request: httpx.Request) -> list[tuple[str, str, bytes]]:
    """A multipart request's parts as (field name, file name, bytes)."""
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    header = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(header + request.content)
    return [
        (part.get_param("name", header="content-disposition"), part.get_filename(), part.get_payload(decode=True))
        for part in message.iter_parts()
    ]


def test_a_busy_service_is_paced_by_its_retry_after_and_fewer_requests_in_flight():
    answers = [httpx.Response(503, headers={"Retry-After": "0.3"}, json={"error": "busy"})] * 2
    answers.append(httpx.Response(200, json={"embeddings": [[1.0, 0.0]], "dimension": 2}))
    transport = httpx.MockTransport(lambda request: answers.pop(0))
    limiter = _Limiter(4)
    with EmbedClient("http://siglip", retries=0, transport=transport) as client:
        started = time.monotonic()
        assert _patiently(lambda: client.embed_images([b"jpeg"]), limiter, 60, "images") == [[1.0, 0.0]]
    assert time.monotonic() - started >= 0.6  # two Retry-After waits
    assert limiter.limit == 2  # 4 -> 2 -> 1 on the two 503s, +1 on the success


def test_busy_carries_retry_after_and_an_absent_service_ends_after_max_wait():
    transport = httpx.MockTransport(lambda request: httpx.Response(429, headers={"Retry-After": "7"}, json={}))
    with EmbedClient("http://siglip", retries=0, transport=transport) as client, pytest.raises(ServiceBusy) as busy:
        client.health()
    assert busy.value.retry_after == 7.0

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    absent = EmbedClient("http://siglip", retries=0, transport=httpx.MockTransport(refused))
    with absent, pytest.raises(Unreachable, match="no answer for 1 s"):
        _patiently(absent.health, _Limiter(1), 1, "the image service")
