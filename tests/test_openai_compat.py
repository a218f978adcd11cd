"""OpenAI-compatible /v1/embeddings and /v1/models, the API key and the project's metrics, on real
`bentoml serve` processes, driven by the official `openai` client (a client nobody here wrote)."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from embed_client import EmbedClient, Unauthorized
from tests.conftest import serve
from tests.references import qwen3_embedding_reference, reference_texts

pytestmark = pytest.mark.serve

API_KEY = "s3cret-key-for-tests"
ITEM_LIMIT = 8
MAX_REQUEST_MB = 1
TEXTS = ["一只橙色的猫在阳光下晒太阳", "a black dog runs on the grass", "cat"]


def own_home(tmp_path_factory) -> dict[str, str]:
    """A BENTOML_HOME of its own: BentoML keeps its Prometheus files in $BENTOML_HOME/prometheus_multiproc_dir
    and empties that directory whenever a server starts, so two servers sharing a home lose each other's metrics."""
    return {"BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml-home"))}


@pytest.fixture(scope="module")
def qwen3_8b(qwen3_embedding_dir, tmp_path_factory):
    """Qwen3Embed8B (unquantized, the packed padding-free path on CPU) behind an API key."""
    env = {
        "QWEN3_8B_EMBED_MODEL": str(qwen3_embedding_dir),
        "QWEN3_8B_EMBED_QUANTIZATION": "none",
        "EMBED_API_KEY": API_KEY,
        "EMBED_MAX_ITEMS_PER_REQUEST": str(ITEM_LIMIT),
        "EMBED_MAX_REQUEST_MB": str(MAX_REQUEST_MB),
        "EMBED_OPENAI_MAX_INPUTS": str(ITEM_LIMIT),
        **own_home(tmp_path_factory),
    }
    yield from serve("Qwen3Embed8B", env, tmp_path_factory.mktemp("logs") / "qwen3_8b_openai.log")


@pytest.fixture(scope="module")
def siglip(siglip_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "siglip2_openai.log"
    yield from serve("Siglip2Embed", {"SIGLIP2_EMBED_MODEL": str(siglip_dir), **own_home(tmp_path_factory)}, log)


@pytest.fixture(scope="module")
def client(qwen3_8b):
    with openai.OpenAI(base_url=f"{qwen3_8b.url}/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


def authorized(served, method: str, path: str, **kwargs):
    headers = {"Authorization": f"Bearer {API_KEY}", **kwargs.pop("headers", {})}
    return served.client.request(method, path, headers=headers, **kwargs)


def token_counts(model_dir, texts: list[str]) -> list[int]:
    """What the model reads, from the checkpoint's own tokenizer (Qwen3-Embedding's appends <|endoftext|>)."""
    return [len(ids) for ids in AutoTokenizer.from_pretrained(str(model_dir))(texts)["input_ids"]]


def metric(served, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`, from GET /metrics."""
    text = authorized(served, "GET", "/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- the openai client ---------------------------------------------------------------------------------


def test_openai_client_embeddings_match_the_model_card(client, qwen3_embedding_dir):
    answer = client.embeddings.create(model="qwen3_8b_embed", input=TEXTS, encoding_format="float")
    assert [item.index for item in answer.data] == [0, 1, 2]
    expected = qwen3_embedding_reference(qwen3_embedding_dir, TEXTS)
    assert torch.allclose(torch.tensor([item.embedding for item in answer.data]), expected, atol=1e-5)
    assert answer.model == "qwen3_8b_embed" and answer.object == "list"
    counted = sum(token_counts(qwen3_embedding_dir, TEXTS))
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == counted


def test_openai_client_decodes_base64(client, qwen3_embedding_dir):
    """The client's default asks for base64 and decodes it itself (little-endian float32)."""
    answer = client.embeddings.create(model="any-name-is-accepted", input="一只可爱的猫")
    vector = torch.tensor(answer.data[0].embedding)
    assert vector.shape == (64,)
    assert torch.allclose(vector, qwen3_embedding_reference(qwen3_embedding_dir, ["一只可爱的猫"])[0], atol=1e-5)


def test_base64_is_little_endian_float32_on_the_wire(qwen3_8b):
    body = {"input": ["cat", "dog"], "model": "m", "encoding_format": "base64"}
    encoded = authorized(qwen3_8b, "POST", "/v1/embeddings", json=body).json()
    floats = authorized(qwen3_8b, "POST", "/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    for packed, plain in zip(encoded["data"], floats["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(packed["embedding"]), dtype="<f4")
        assert np.allclose(decoded, plain["embedding"], atol=1e-7)


def test_dimensions_and_instruction(client, qwen3_embedding_dir):
    answer = client.embeddings.create(model="m", input=TEXTS, dimensions=32, encoding_format="float")
    expected = F.normalize(qwen3_embedding_reference(qwen3_embedding_dir, TEXTS)[:, :32], dim=1)
    assert torch.allclose(torch.tensor([item.embedding for item in answer.data]), expected, atol=1e-5)
    instruction = "Retrieve relevant images"
    instructed = client.embeddings.create(
        model="m", input=["橙色猫"], encoding_format="float", extra_body={"instruction": instruction}
    )
    expected = qwen3_embedding_reference(qwen3_embedding_dir, ["橙色猫"], instruction)[0]
    assert torch.allclose(torch.tensor(instructed.data[0].embedding), expected, atol=1e-5)
    prompt = f"Instruct: {instruction}\nQuery:橙色猫"
    assert instructed.usage.prompt_tokens == token_counts(qwen3_embedding_dir, [prompt])[0]


def test_models_list_and_retrieve(client):
    [model] = client.models.list().data
    assert (model.id, model.object, model.owned_by) == ("qwen3_8b_embed", "model", "embed-services")
    assert isinstance(model.created, int) and model.created > 0
    assert client.models.retrieve("qwen3_8b_embed").id == "qwen3_8b_embed"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


OPENAI_BAD_INPUT = [
    ("empty string", {"input": ""}, 400, "input[0]"),
    ("empty string in a list", {"input": ["ok", ""]}, 400, "input[1]"),
    ("only blank strings", {"input": ["  ", "\n"]}, 400, "input[0]"),
    ("empty list", {"input": []}, 400, "input"),
    ("token ids and strings", {"input": ["a", [1, 2]]}, 400, "input"),
    ("an empty token id list", {"input": [[1, 2], []]}, 400, "input[1]"),
    ("dimensions out of range", {"input": "a", "dimensions": 8}, 400, "dimensions"),
    ("too many inputs", {"input": ["a"] * (ITEM_LIMIT + 1)}, 413, "input"),
]


@pytest.mark.parametrize(("case", "body", "status", "param"), OPENAI_BAD_INPUT)
def test_openai_client_parses_the_errors(client, case, body, status, param):
    with pytest.raises(openai.APIStatusError) as failure:
        client.embeddings.create(model="m", encoding_format="float", **body)
    error = failure.value
    assert error.status_code == status, case
    if status == 400:
        assert isinstance(error, openai.BadRequestError)
    assert error.body["param"] == param and error.body["type"] == "invalid_request_error"
    assert param in error.body["message"] or "input" in error.body["message"]


RAW_BAD_REQUESTS = [
    ("malformed JSON", b'{"input": ["a",', 400),
    ("not UTF-8", b'{"input": "\xff\xfe"}', 400),
    ("empty body", b"", 400),
    ("a JSON list", b'["a"]', 400),
    ("input of the wrong type", b'{"input": 5}', 400),
    ("dimensions of the wrong type", b'{"input": "a", "dimensions": "many"}', 400),
    ("unknown encoding", b'{"input": "a", "encoding_format": "int8"}', 400),
    ("a lone surrogate escape", b'{"input": "a\\ud800b"}', 400),
    ("nesting deeper than the parser goes", b"[" * 100_000, 400),
]


@pytest.mark.parametrize(("case", "raw", "status"), RAW_BAD_REQUESTS)
def test_malformed_requests_get_openai_shaped_errors(qwen3_8b, case, raw, status):
    answer = authorized(qwen3_8b, "POST", "/v1/embeddings", content=raw, headers={"Content-Type": "application/json"})
    assert answer.status_code == status, (case, answer.text)
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], case


def test_routing_errors_on_v1_are_openai_shaped_and_seed_paths_keep_their_own(qwen3_8b):
    unknown = authorized(qwen3_8b, "POST", "/v1/chat/completions", json={})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    wrong_method = authorized(qwen3_8b, "GET", "/v1/embeddings")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    seed = authorized(qwen3_8b, "POST", "/embed/text", json={"text": ""})
    assert seed.status_code == 400 and isinstance(seed.json()["error"], str)  # the project's own shape


def test_tei_routes_refuse_an_oversized_or_non_json_body_in_teis_shape(qwen3_8b):
    """The body checks answer before any route: on TEI's /embed their 413 and 415 come in TEI's error shape."""
    big = authorized(qwen3_8b, "POST", "/embed", json={"inputs": "a" * (2 * MAX_REQUEST_MB * 2**20)})
    assert big.status_code == 413, big.text[:200]
    assert big.json()["error_type"] == "Validation" and str(MAX_REQUEST_MB * 2**20) in big.json()["error"]
    as_text = authorized(
        qwen3_8b, "POST", "/embed", content=b'{"inputs": "cat"}', headers={"Content-Type": "text/plain"}
    )
    assert as_text.status_code == 415 and set(as_text.json()) == {"error", "error_type"}
    assert authorized(qwen3_8b, "POST", "/embed", json={"inputs": "cat"}).status_code == 200


def test_v1_honours_the_body_limit_and_media_type_of_the_seed_paths(qwen3_8b):
    """EMBED_MAX_REQUEST_MB and the JSON-only check hold on /v1/* as on the seed paths, in OpenAI's shape."""
    big = {"input": "a" * (2 * MAX_REQUEST_MB * 2**20)}  # 2 MB of text: over the 1 MB limit
    for path, body in (("/v1/embeddings", big), ("/embed/text", {"text": big["input"]})):
        answer = authorized(qwen3_8b, "POST", path, json=body)
        assert answer.status_code == 413, (path, answer.text[:200])
    error = authorized(qwen3_8b, "POST", "/v1/embeddings", json=big).json()["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert str(MAX_REQUEST_MB * 2**20) in error["message"]
    # Chunked (no Content-Length): read up to the limit, then refused the same way.
    chunks = iter([b'{"input": "', b"a" * (2 * 2**20), b'"}'])
    chunked = authorized(
        qwen3_8b, "POST", "/v1/embeddings", content=chunks, headers={"Content-Type": "application/json"}
    )
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    as_text = authorized(
        qwen3_8b, "POST", "/v1/embeddings", content=b'{"input": "cat"}', headers={"Content-Type": "text/plain"}
    )
    assert as_text.status_code == 415, as_text.text
    assert set(as_text.json()["error"]) == {"message", "type", "param", "code"}
    assert "application/json" in as_text.json()["error"]["message"]
    # Under the limit and as JSON, the same route still answers.
    assert authorized(qwen3_8b, "POST", "/v1/embeddings", json={"input": "cat"}).status_code == 200


def test_siglip_text_tower_speaks_openai(siglip, siglip_dir):
    with openai.OpenAI(base_url=f"{siglip.url}/v1", api_key="unused", max_retries=0) as client:
        answer = client.embeddings.create(model="siglip2_embed", input=["An orange cat", "a dog"])
        expected = reference_texts(siglip_dir, ["An orange cat", "a dog"])
        assert torch.allclose(torch.tensor([item.embedding for item in answer.data]), expected, atol=1e-5)
        tokenizer = AutoTokenizer.from_pretrained(str(siglip_dir))
        lengths = [len(ids) for ids in tokenizer(["an orange cat", "a dog"]).input_ids]
        assert answer.usage.prompt_tokens == sum(lengths)  # real tokens, not the 64 padded positions
        with pytest.raises(openai.BadRequestError) as failure:
            client.embeddings.create(model="m", input="a", dimensions=16)
        assert failure.value.body["param"] == "dimensions"
        assert [model.id for model in client.models.list().data] == ["siglip2_embed"]


# -- the API key -----------------------------------------------------------------------------------------


def test_wrong_or_missing_key_gets_401_and_no_model_work(qwen3_8b):
    authorized(qwen3_8b, "POST", "/embed/text", json={"text": "so that the counters are not zero"})
    before = qwen3_8b.get("/health").json()
    items_before = metric(qwen3_8b, "embed_items_total", service="qwen3_8b_embed")
    assert items_before > 0
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": "Basic x"}):
        seed = qwen3_8b.post("/embed/text", json={"text": "cat"}, headers=headers)
        assert seed.status_code == 401 and "API key" in seed.json()["error"]
        assert seed.headers["www-authenticate"] == "Bearer"
        v1 = qwen3_8b.post("/v1/embeddings", json={"input": "cat"}, headers=headers)
        assert v1.status_code == 401 and v1.json()["error"]["code"] == "invalid_api_key"
        for path in ("/v1/models", "/metrics", "/docs.json"):
            assert qwen3_8b.get(path, headers=headers).status_code == 401, path
    after = qwen3_8b.get("/health").json()
    assert (after["batches"], after["texts_embedded"]) == (before["batches"], before["texts_embedded"])
    assert metric(qwen3_8b, "embed_items_total", service="qwen3_8b_embed") == items_before
    assert authorized(qwen3_8b, "POST", "/embed/text", json={"text": "cat"}).status_code == 200


def test_probes_and_cors_preflights_need_no_key(qwen3_8b):
    for path in ("/health", "/livez", "/readyz", "/healthz"):
        assert qwen3_8b.get(path).status_code == 200, path
    preflight_headers = {"Origin": "http://app", "Access-Control-Request-Method": "POST"}
    preflight = qwen3_8b.client.options("/v1/embeddings", headers=preflight_headers)
    assert preflight.status_code != 401  # browsers send preflights without credentials (405 here: CORS is off)


def test_openai_client_with_a_wrong_key_raises_authentication_error(qwen3_8b):
    wrong = openai.OpenAI(base_url=f"{qwen3_8b.url}/v1", api_key="wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError) as failure:
        wrong.embeddings.create(model="m", input="cat")
    assert failure.value.body["code"] == "invalid_api_key"


def test_teis_routes_refuse_a_wrong_key_in_teis_error_shape(qwen3_8b, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        tei_routes = ["/embed", "/tokenize", "/decode", "/similarity", "/embed_all", "/embed_sparse", "/predict"]
        for method, path in [*(("POST", path) for path in tei_routes), ("GET", "/info")]:
            refused = qwen3_8b.client.request(method, path, json={"inputs": "cat"}, headers=headers)
            assert refused.status_code == 401, (path, refused.text)
            assert refused.headers["www-authenticate"] == "Bearer"
            body = refused.json()
            # TEI has no error_type of its own for a refused key (it sends no body): a client error is "Validation".
            assert set(body) == {"error", "error_type"} and body["error_type"] == "Validation", (path, body)
            assert "Authorization: Bearer <key>" in body["error"]
    # A TEI client at its defaults (huggingface_hub sends its token as the bearer key).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HfHubHTTPError) as failure:
        InferenceClient(model=f"{qwen3_8b.url}/embed", token="wrong").feature_extraction("cat")
    assert failure.value.response.status_code == 401 and "API key" in str(failure.value)
    vectors = InferenceClient(model=f"{qwen3_8b.url}/embed", token=API_KEY).feature_extraction(["cat"])
    assert vectors.shape == (1, 64)


# -- metrics -----------------------------------------------------------------------------------------------


def test_metrics_count_tokens_items_and_padding(qwen3_8b, qwen3_embedding_dir):
    service = {"service": "qwen3_8b_embed"}
    before = {
        name: metric(qwen3_8b, name, **service)
        for name in ("embed_tokens_total", "embed_padded_tokens_total", "embed_queue_seconds_count")
    }
    items_before = metric(qwen3_8b, "embed_items_total", item="text", **service)
    texts = ["an orange cat sleeps in the sun", "cat", "a black dog runs on the grass " * 5]
    assert authorized(qwen3_8b, "POST", "/embed/texts", json={"texts": texts}).status_code == 200
    tokens = sum(token_counts(qwen3_embedding_dir, texts))
    assert metric(qwen3_8b, "embed_tokens_total", **service) - before["embed_tokens_total"] == tokens
    # The packed Qwen3 path computes no padding at all: padded positions == real tokens (ratio 1.0).
    assert metric(qwen3_8b, "embed_padded_tokens_total", **service) - before["embed_padded_tokens_total"] == tokens
    assert metric(qwen3_8b, "embed_items_total", item="text", **service) - items_before == 3
    assert metric(qwen3_8b, "embed_queue_seconds_count", **service) - before["embed_queue_seconds_count"] == 1
    assert metric(qwen3_8b, "embed_padding_ratio_bucket", le="1.0", **service) >= 1
    assert metric(qwen3_8b, "embed_compute_seconds_count", **service) >= 1
    assert metric(qwen3_8b, "embed_forward_batch_size_count", item="text", **service) >= 1


def test_padded_models_report_their_padding(siglip, siglip_dir):
    """SigLIP pads every text to 64 positions, so positions computed = 64 per text; real tokens are fewer."""
    service = {"service": "siglip2_embed"}
    tokens_before = metric(siglip, "embed_tokens_total", **service)
    padded_before = metric(siglip, "embed_padded_tokens_total", **service)
    texts = ["an orange cat", "a red square and a blue circle on a white page"]
    assert siglip.post("/embed/texts", json={"texts": texts}).status_code == 200
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(str(siglip_dir))(texts)["input_ids"]]
    assert metric(siglip, "embed_tokens_total", **service) - tokens_before == sum(lengths)
    assert metric(siglip, "embed_padded_tokens_total", **service) - padded_before == 64 * len(texts)
    images_before = metric(siglip, "embed_items_total", item="image", **service)
    png = base64.b64encode(_png()).decode()
    assert siglip.post("/embed/images", json={"images": [png, png]}).status_code == 200
    assert metric(siglip, "embed_items_total", item="image", **service) - images_before == 2


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 100, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- embed_client on the same servers: an API key, and images ---------------------------------------------


def test_embed_client_sends_the_api_key(qwen3_8b, qwen3_embedding_dir):
    with EmbedClient(qwen3_8b.url, api_key=API_KEY) as client:
        vector = client.get_embedding("一只可爱的猫", dimensions=32)
    expected = F.normalize(qwen3_embedding_reference(qwen3_embedding_dir, ["一只可爱的猫"])[:, :32], dim=1)[0]
    assert torch.allclose(torch.tensor(vector), expected, atol=1e-5)
    with EmbedClient(qwen3_8b.url) as keyless, pytest.raises(Unauthorized):
        keyless.get_embedding("cat")


def test_embed_client_embeds_images(siglip, siglip_dir, tmp_path):
    from PIL import Image

    from tests.references import reference_images

    path = tmp_path / "orange.png"
    path.write_bytes(_png())
    with EmbedClient(siglip.url) as client:
        from_path = client.embed_image(path)
        from_bytes = client.embed_images([_png(), path.read_bytes()])
    expected = reference_images(siglip_dir, [Image.open(path).convert("RGB")])[0]
    assert torch.allclose(torch.tensor(from_path), expected, atol=1e-5)
    assert torch.allclose(torch.tensor(from_bytes), expected.expand(2, -1), atol=1e-5)
