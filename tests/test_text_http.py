"""The three text-embedding services as real `bentoml serve` processes, over HTTP."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import serve
from tests.references import bge_reference, qwen3_embedding_reference

pytestmark = pytest.mark.serve

MALFORMED_SIGLIP_SETTING = {"SIGLIP2_EMBED_MAX_IMAGE_BYTES": "lots"}


@pytest.fixture(scope="module")
def qwen3_8b(qwen3_embedding_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "qwen3_8b_embed.log"
    yield from serve(
        "Qwen3Embed8B", {"QWEN3_8B_EMBED_MODEL": str(qwen3_embedding_dir), "QWEN3_8B_EMBED_QUANTIZATION": "none"}, log
    )


@pytest.fixture(scope="module")
def bge(bge_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "bge_embed.log"
    # Another service's malformed setting is not this one's business: BgeEmbed starts all the same.
    env = {"BGE_EMBED_MODEL": str(bge_dir), "EMBED_MAX_ITEMS_PER_REQUEST": "8", **MALFORMED_SIGLIP_SETTING}
    yield from serve("BgeEmbed", env, log)


def test_health_describes_the_loaded_model(qwen3_8b, qwen3_embedding_dir):
    health = qwen3_8b.get("/health").json()
    assert health["status"] == "ok"
    assert health["model"] == str(qwen3_embedding_dir)
    assert (health["dimension"], health["device"], health["dtype"], health["quantization"]) == (
        64,
        "cpu",
        "float32",
        "none",
    )
    assert health["pooling"] == "last" and health["max_length"] == 1024  # capped by the tiny model's positions
    for probe in ("/livez", "/readyz", "/metrics"):  # BentoML's own endpoints still answer
        assert qwen3_8b.get(probe).status_code == 200


def test_embed_text_matches_the_model_card(qwen3_8b, qwen3_embedding_dir):
    answer = qwen3_8b.post("/embed/text", json={"text": "一只橙色的猫在阳光下晒太阳"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["dimension"] == 64 == len(body["embedding"])
    expected = qwen3_embedding_reference(qwen3_embedding_dir, ["一只橙色的猫在阳光下晒太阳"])[0]
    assert torch.allclose(torch.tensor(body["embedding"]), expected, atol=1e-5)

    instructed = qwen3_8b.post("/embed/text", json={"text": "橙色猫", "instruction": "Retrieve relevant images"})
    expected = qwen3_embedding_reference(qwen3_embedding_dir, ["橙色猫"], "Retrieve relevant images")[0]
    assert torch.allclose(torch.tensor(instructed.json()["embedding"]), expected, atol=1e-5)


def test_embed_texts_keeps_input_order_and_cuts_dimensions(qwen3_8b, qwen3_embedding_dir):
    texts = ["a black dog runs on the grass " * 8, "cat", "an orange cat sleeps in the sun"]
    body = qwen3_8b.post("/embed/texts", json={"texts": texts, "dimensions": 32}).json()
    expected = F.normalize(qwen3_embedding_reference(qwen3_embedding_dir, texts)[:, :32], dim=1)
    assert body["dimension"] == 32
    assert torch.allclose(torch.tensor(body["embeddings"]), expected, atol=1e-5)


@pytest.fixture
def fresh_qwen3_8b(qwen3_embedding_dir, tmp_path):
    """A server of its own: its queue has seen no round yet."""
    env = {"QWEN3_8B_EMBED_MODEL": str(qwen3_embedding_dir), "QWEN3_8B_EMBED_QUANTIZATION": "none"}
    yield from serve("Qwen3Embed8B", env, tmp_path / "qwen3_8b_embed.log")


def test_concurrent_single_text_requests_share_forward_passes(fresh_qwen3_8b):
    """While the model computes one request, 47 more arrive one text each: the next round takes them all.

    The model is held (tests/model_gate) until all 47 are queued, so nothing here depends on timing. On a fresh
    server the first round alone decides what counts as a small request (twice its cost), and these texts, all
    of one length, are small.
    """
    served, gate = fresh_qwen3_8b, fresh_qwen3_8b.gate
    texts = [f"text number {i:02d} " + "cat " * 3 for i in range(48)]

    def one(text: str) -> list[float]:
        answer = served.post("/embed/text", json={"text": text})
        assert answer.status_code == 200, answer.text
        return answer.json()["embedding"]

    with ThreadPoolExecutor(max_workers=len(texts)) as pool:
        gate.close()
        first = pool.submit(one, texts[0])
        gate.wait_until(lambda: gate.rounds() == [1], "the first request's round")
        rest = [pool.submit(one, text) for text in texts[1:]]
        gate.wait_until(lambda: len(gate.submitted()) == len(texts), "every request queued")
        gate.open()
        together = [first.result(), *(future.result() for future in rest)]
    assert gate.rounds() == [1, len(texts) - 1]  # merged into one forward pass
    health = served.get("/health").json()
    assert (health["batches"], health["texts_embedded"]) == (2, len(texts))
    alone = [one(text) for text in texts[:4]]
    for vector, expected in zip(together[:4], alone, strict=True):
        assert F.cosine_similarity(torch.tensor(expected), torch.tensor(vector), dim=0) >= 0.9999


BAD_REQUESTS = [
    ("/embed/text", {"text": ""}),
    ("/embed/text", {"text": "   \n\t"}),
    ("/embed/text", {}),
    ("/embed/text", {"text": 5}),
    ("/embed/text", {"text": ["a"]}),
    ("/embed/text", {"text": "a", "dimensions": 10}),
    ("/embed/text", {"text": "a", "dimensions": 10**40}),
    ("/embed/text", {"text": "a", "dimensions": "many"}),
    ("/embed/text", {"text": "a", "instruction": 3}),
    ("/embed/texts", {"texts": []}),
    ("/embed/texts", {"texts": "a single string"}),
    ("/embed/texts", {"texts": ["ok", None]}),
    ("/embed/texts", {"texts": ["ok", ""]}),
    ("/embed/texts", {"texts": ["ok"] * 9}),  # over EMBED_MAX_ITEMS_PER_REQUEST=8
    ("/embed/texts", {"texts": ["ok"], "dimension": 16}),  # a misspelt field is refused, not ignored
]


@pytest.mark.parametrize(("path", "body"), BAD_REQUESTS)
def test_bad_input_gets_a_4xx_json_error_and_the_service_keeps_serving(bge, path, body):
    answer = bge.post(path, json=body)
    assert 400 <= answer.status_code < 500, answer.text
    assert isinstance(answer.json()["error"], str)
    assert bge.post("/embed/text", json={"text": "一只猫"}).status_code == 200


@pytest.mark.parametrize("raw", [b"{bad json", b'{"text": "\xff\xfe"}', b""])
def test_malformed_bodies_get_a_4xx_json_error(bge, raw):
    answer = bge.post("/embed/text", content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= answer.status_code < 500
    assert "error" in answer.json()


def test_bge_service_matches_the_model_card(bge, bge_dir):
    texts = ["一只橙色的猫在阳光下晒太阳", "黑狗在草地上奔跑"]
    instruction = "为这个句子生成表示以用于检索相关文章："
    body = bge.post("/embed/texts", json={"texts": texts, "instruction": instruction}).json()
    assert torch.allclose(torch.tensor(body["embeddings"]), bge_reference(bge_dir, texts, instruction), atol=1e-5)
    assert bge.get("/health").json()["pooling"] == "cls"


def test_qwen3_4b_service_serves_the_z_image_text_encoder(zimage_root, tmp_path):
    for served in serve("Qwen3Embed4B", {"QWEN3_4B_EMBED_MODEL": str(zimage_root)}, tmp_path / "4b.log"):
        health = served.get("/health").json()
        assert (health["pooling"], health["dimension"], health["quantization"]) == ("mean", 64, "none")
        vector = served.post("/embed/text", json={"text": "橙色猫"}).json()["embedding"]
        assert abs(sum(x * x for x in vector) - 1) < 1e-5


def test_a_missing_model_stops_start_up_with_a_message_naming_the_variable(tmp_path):
    with pytest.raises(RuntimeError) as failure:
        for _ in serve("BgeEmbed", {"BGE_EMBED_MODEL": str(tmp_path / "nowhere")}, tmp_path / "bad.log"):
            pass
    assert "BGE_EMBED_MODEL" in str(failure.value) and "no such directory" in str(failure.value)


def test_requests_keep_fresh_trace_ids_but_record_no_spans_without_an_exporter(bge):
    """BentoML would record a span per request even with tracing off; here none is recorded (a worker's
    start_serving() calls record_spans_only_when_exported), while the access log still gets a fresh trace id per
    request."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    from embed_http.openapi import record_spans_only_when_exported

    record_spans_only_when_exported()

    span = BentoMLContainer.tracer_provider.get().get_tracer("test").start_span("request")
    assert not span.is_recording() and span.get_span_context().is_valid
    for text in ("一只猫", "黑狗", "草地"):
        assert bge.post("/embed/text", json={"text": text}).status_code == 200
    logged = re.findall(
        r"path=/embed/text,.*\(status=200.*trace=([0-9a-f]{32}),span=([0-9a-f]{16})", bge.log_path.read_text()
    )
    assert len(logged) >= 3
    traces = [trace for trace, _ in logged]
    assert len(set(traces)) == len(traces) and "0" * 32 not in traces


def test_start_up_moves_what_it_loaded_out_of_the_collectors_reach(bge_dir, monkeypatch):
    """gc.freeze after the model is loaded: full collections then skip the model's objects (service.py)."""
    import gc

    import service

    monkeypatch.setenv("BGE_EMBED_MODEL", str(bge_dir))
    monkeypatch.setenv("EMBED_DEVICE", "cpu")
    gc.unfreeze()
    instance = service.BgeEmbed.inner()
    try:
        assert gc.get_freeze_count() > 10_000  # torch, transformers, the model's modules and tensors
        assert instance.engine.batcher.observer is not None  # the metrics are attached too
    finally:
        instance.engine.close()
        gc.unfreeze()


def test_a_malformed_setting_of_another_service_does_not_stop_this_one(bge):
    """Settings are read per service as it starts: SigLIP2's malformed MAX_IMAGE_BYTES (set for this server)
    does not stop BgeEmbed, whose image-free routes answer."""
    assert bge.get("/health").json()["service"] == "bge_embed"
    assert bge.post("/embed/text", json={"text": "cat"}).status_code == 200
