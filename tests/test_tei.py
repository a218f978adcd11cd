"""TEI's API (embed_http/tei.py) as text-embeddings-inference's own published OpenAPI document describes it
(tests/data/tei/openapi.json, v1.9.3): every answer validated against its schemas, `nullable` included, on a text
embedder (tiny BGE) and a reranker (tiny Qwen3-Reranker); the real TEI clients at their defaults (Haystack's
HuggingFaceTEIRanker, LlamaIndex's TEI rerank, huggingface_hub's InferenceClient); and TEI's error shapes.

The references are independent of the code under test: the model's own tokenizer (transformers), numpy's cosine,
the sigmoid's inverse, and TEI's document.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openapi_schema_validator import OAS30Validator
from transformers import AutoTokenizer

from tests.conftest import BGE_SERVED_MAX_LENGTH, BGE_VOCAB_TEXT, Served, serve_tiny

pytestmark = pytest.mark.serve

TEI_DOCUMENT = json.loads((Path(__file__).parent / "data" / "tei" / "openapi.json").read_text())
CHARS = list(dict.fromkeys(BGE_VOCAB_TEXT))
TEXTS = ["一只橙色的猫在阳光下晒太阳", "黑狗在草地上奔跑", "可爱的猫咪在睡觉"]
LONG = "".join(CHARS[:40])  # over BGE_SERVED_MAX_LENGTH tokens
QUERY = "an orange cat"
DOCUMENTS = ["an orange cat sleeps in the sun", "a black dog runs on the grass", "", "一只橙色的猫"]


def tei_schema(name: str) -> OAS30Validator:
    return OAS30Validator({"$ref": f"#/components/schemas/{name}", "components": TEI_DOCUMENT["components"]})


def answer_schema(path: str, method: str = "post", status: str = "200") -> OAS30Validator:
    """The schema TEI's document gives the answer of `path` (a $ref to one of its components)."""
    content = TEI_DOCUMENT["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    return OAS30Validator({**content, "components": TEI_DOCUMENT["components"]})


def request_schema(path: str) -> OAS30Validator:
    content = TEI_DOCUMENT["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return OAS30Validator({**content, "components": TEI_DOCUMENT["components"]})


def tei_call(served: Served, path: str, body: dict[str, Any], status: int = 200) -> Any:
    """POST a request that TEI's document calls valid; the answer validated against TEI's schema for `status`."""
    request_schema(path).validate(body)
    response = served.post(path, json=body)
    assert response.status_code == status, (path, body, response.text[:300])
    schema = answer_schema(path) if status == 200 else tei_schema("ErrorResponse")
    schema.validate(response.json())
    return response.json()


def assert_tei_error(response: Any, status: int, error_type: str | None = None) -> dict:
    assert response.status_code == status, response.text[:300]
    body = response.json()
    tei_schema("ErrorResponse").validate(body)
    assert set(body) == {"error", "error_type"} and body["error"]
    if error_type is not None:
        assert body["error_type"] == error_type, body
    return body


# -- a text embedder ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bge(bge_served):
    return bge_served


@pytest.fixture(scope="module")
def bge_tokenizer(bge_dir):
    return AutoTokenizer.from_pretrained(str(bge_dir))


def seed_vectors(served: Served, texts: list[str]) -> np.ndarray:
    answer = served.post("/embed/texts", json={"texts": texts})
    assert answer.status_code == 200, answer.text
    return np.array(answer.json()["embeddings"])


def test_embed_takes_strings_lists_and_token_ids_as_the_models_own_tokens(bge, bge_tokenizer):
    expected = seed_vectors(bge, TEXTS)
    one = tei_call(bge, "/embed", {"inputs": TEXTS[0]})
    np.testing.assert_allclose(one, expected[:1], atol=1e-5)
    many = tei_call(bge, "/embed", {"inputs": TEXTS})
    np.testing.assert_allclose(many, expected, atol=1e-5)
    # Token ids, as the model's tokenizer writes them (special tokens included), embed to the text's own vector.
    ids = [bge_tokenizer(text)["input_ids"] for text in TEXTS]
    np.testing.assert_allclose(tei_call(bge, "/embed", {"inputs": ids[1]}), expected[1:2], atol=1e-5)
    np.testing.assert_allclose(tei_call(bge, "/embed", {"inputs": ids}), expected, atol=1e-5)
    mixed = tei_call(bge, "/embed", {"inputs": [TEXTS[0], ids[1], TEXTS[2]]})
    np.testing.assert_allclose(mixed, expected, atol=1e-5)
    # Not decoded and encoded again: ids without the special tokens are another input, with another vector.
    bare = tei_call(bge, "/embed", {"inputs": ids[0][1:-1]})
    assert not np.allclose(bare, expected[:1], atol=1e-3)


def test_token_ids_over_max_length_are_cut_or_refused_as_asked(bge, bge_tokenizer):
    ids = bge_tokenizer(LONG)["input_ids"]
    assert len(ids) > BGE_SERVED_MAX_LENGTH
    cut = tei_call(bge, "/embed", {"inputs": ids})
    np.testing.assert_allclose(cut, tei_call(bge, "/embed", {"inputs": ids[:BGE_SERVED_MAX_LENGTH]}), atol=1e-6)
    left = tei_call(bge, "/embed", {"inputs": ids, "truncation_direction": "Left"})
    np.testing.assert_allclose(left, tei_call(bge, "/embed", {"inputs": ids[-BGE_SERVED_MAX_LENGTH:]}), atol=1e-6)
    error = tei_call(bge, "/embed", {"inputs": [TEXTS[0], ids], "truncate": False}, status=422)
    assert error["error_type"] == "Validation" and "inputs[1]" in error["error"]
    unknown = tei_call(bge, "/embed", {"inputs": [ids[0], len(bge_tokenizer) + 5]}, status=422)
    assert unknown["error_type"] == "Tokenizer" and str(len(bge_tokenizer) + 5) in unknown["error"]


def test_tokenize_and_decode_follow_the_models_tokenizer(bge, bge_tokenizer):
    [tokens] = tei_call(bge, "/tokenize", {"inputs": TEXTS[0]})
    assert [token["id"] for token in tokens] == bge_tokenizer(TEXTS[0])["input_ids"]
    decoded = tei_call(bge, "/decode", {"ids": [token["id"] for token in tokens]})
    assert decoded == [bge_tokenizer.decode(bge_tokenizer(TEXTS[0])["input_ids"], skip_special_tokens=True)]
    ids = [bge_tokenizer(text)["input_ids"] for text in TEXTS]
    with_specials = tei_call(bge, "/decode", {"ids": ids, "skip_special_tokens": False})
    assert with_specials == [bge_tokenizer.decode(one, skip_special_tokens=False) for one in ids]
    assert with_specials[0].startswith("[CLS]")
    assert_tei_error(bge.post("/decode", json={"ids": [[5, len(bge_tokenizer)]]}), 422, "Tokenizer")
    assert_tei_error(bge.post("/decode", json={"ids": []}), 400, "Empty")


def test_similarity_is_the_cosine_of_the_texts_vectors(bge, monkeypatch):
    vectors = seed_vectors(bge, TEXTS)
    expected = [float(np.dot(vectors[0], other) / np.linalg.norm(vectors[0]) / np.linalg.norm(other)) for other in
                vectors[1:]]  # fmt: skip
    body = {"inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS[1:]}}
    np.testing.assert_allclose(tei_call(bge, "/similarity", body), expected, atol=1e-5)
    # huggingface_hub's InferenceClient has a call for this route.
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # it only reaches the local server
    scores = InferenceClient(model=f"{bge.url}/similarity").sentence_similarity(TEXTS[0], TEXTS[1:])
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_info_has_every_field_teis_schema_requires(bge):
    response = bge.get("/info")
    assert response.status_code == 200
    info = response.json()
    answer_schema("/info", "get").validate(info)
    assert info["model_type"] == {"embedding": {"pooling": "cls"}}
    assert info["served_model_name"] == info["model_id"] == "bge_embed"
    assert info["max_input_length"] == BGE_SERVED_MAX_LENGTH


@pytest.mark.parametrize("path", ["/embed_all", "/embed_sparse", "/predict"])
def test_the_routes_of_other_model_types_answer_teis_424(bge, path):
    assert_tei_error(bge.post(path, json={"inputs": "cat"}), 424, "Backend")


BAD_EMBEDDINGS: list[tuple[str, dict[str, Any], int, str]] = [  # what, httpx arguments, status, TEI's error_type
    ("malformed JSON", {"content": b'{"inputs": ["a",', "headers": {"content-type": "application/json"}}, 400, ""),
    ("a JSON list", {"json": ["a"]}, 400, "Validation"),
    ("inputs of the wrong type", {"json": {"inputs": 5}}, 400, "Validation"),
    ("a float among token ids", {"json": {"inputs": [101, 1.5]}}, 400, "Validation"),
    ("a misspelt option", {"json": {"inputs": "a", "truncation": True}}, 400, "Validation"),
    ("empty inputs", {"json": {"inputs": []}}, 400, "Empty"),
    ("a blank text", {"json": {"inputs": ["猫", " "]}}, 400, "Validation"),
    ("normalize false", {"json": {"inputs": "猫", "normalize": False}}, 400, "Validation"),
    ("too many inputs", {"json": {"inputs": ["猫"] * 257}}, 413, "Validation"),
    ("not JSON", {"content": b'{"inputs": "a"}', "headers": {"content-type": "text/plain"}}, 415, "Validation"),
]


@pytest.mark.parametrize(
    ("what", "request_", "status", "error_type"), BAD_EMBEDDINGS, ids=[c[0] for c in BAD_EMBEDDINGS]
)
def test_bad_requests_get_teis_error_shape(bge, what, request_, status, error_type):
    for path in ("/embed", "/tokenize"):
        if path == "/tokenize" and what in ("a float among token ids", "normalize false"):
            continue  # options of /embed alone
        assert_tei_error(bge.post(path, **request_), status, error_type or None)


# -- a reranker -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reranker(request, tmp_path_factory):
    yield from serve_tiny(request, "qwen3_8b_rerank", tmp_path_factory, EMBED_MAX_ITEMS_PER_REQUEST="8")


def seed_scores(served: Served, documents: list[str]) -> list[float]:
    answer = served.post("/rerank", json={"query": QUERY, "documents": documents})
    assert answer.status_code == 200, answer.text
    results = sorted(answer.json()["results"], key=lambda result: result["original_index"])
    return [result["score"] for result in results]


def test_teis_rerank_shares_the_seeds_path_and_scores(reranker):
    expected = seed_scores(reranker, DOCUMENTS)
    ranks = tei_call(reranker, "/rerank", {"query": QUERY, "texts": DOCUMENTS})
    assert [rank["index"] for rank in ranks] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    assert all("text" not in rank for rank in ranks)
    np.testing.assert_allclose(
        [expected[rank["index"]] for rank in ranks], [rank["score"] for rank in ranks], atol=1e-6
    )
    with_text = tei_call(reranker, "/rerank", {"query": QUERY, "texts": DOCUMENTS, "return_text": True})
    assert all(rank["text"] == DOCUMENTS[rank["index"]] for rank in with_text)
    # raw_scores: the logit difference yes - no, whose sigmoid is the score (the inverse written here).
    raw = tei_call(reranker, "/rerank", {"query": QUERY, "texts": DOCUMENTS, "raw_scores": True})
    for rank in raw:
        probability = expected[rank["index"]]
        assert rank["score"] == pytest.approx(math.log(probability / (1 - probability)), abs=1e-4)
    # The seed's /rerank is unchanged beside it.
    seed = reranker.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_k": 2}).json()
    assert set(seed) == {"results"} and len(seed["results"]) == 2 and "original_index" in seed["results"][0]


def test_reranker_info_tokenize_and_decode(reranker, qwen3_reranker_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_reranker_dir))
    info = reranker.get("/info").json()
    answer_schema("/info", "get").validate(info)
    assert "reranker" in info["model_type"] and info["served_model_name"] == "qwen3_8b_rerank"
    [tokens] = tei_call(reranker, "/tokenize", {"inputs": DOCUMENTS[0]})
    assert [token["id"] for token in tokens] == tokenizer(DOCUMENTS[0])["input_ids"]
    assert "".join(token["text"] for token in tokens) == DOCUMENTS[0]
    assert tei_call(reranker, "/decode", {"ids": [token["id"] for token in tokens]}) == [DOCUMENTS[0]]
    assert_tei_error(reranker.post("/embed", json={"inputs": "a"}), 424, "Backend")


def test_teis_rerank_errors_are_in_teis_shape(reranker):
    assert_tei_error(reranker.post("/rerank", json={"query": QUERY, "texts": []}), 400, "Empty")
    assert_tei_error(reranker.post("/rerank", json={"query": QUERY, "texts": ["a"] * 9}), 413, "Validation")
    assert_tei_error(reranker.post("/rerank", json={"query": QUERY, "texts": "a"}), 400, "Validation")
    assert_tei_error(reranker.post("/rerank", json={"query": " ", "texts": ["a"]}), 400, "Validation")
    assert_tei_error(reranker.post("/rerank", json={"query": QUERY, "texts": ["a"], "raw_scores": 1}), 400)
    # A body that names `documents` is the seed's, answered in the seed's shape.
    seed = reranker.post("/rerank", json={"query": QUERY, "documents": []})
    assert seed.status_code == 400 and "error_type" not in seed.json()


def test_haystacks_tei_ranker_at_its_defaults(reranker):
    from haystack import Document
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    expected = seed_scores(reranker, DOCUMENTS[:2] + DOCUMENTS[3:])
    ranker = HuggingFaceTEIRanker(url=reranker.url)
    documents = [Document(content=text) for text in DOCUMENTS[:2] + DOCUMENTS[3:]]
    ranked = ranker.run(query=QUERY, documents=documents)["documents"]
    assert sorted(expected, reverse=True) == pytest.approx([document.score for document in ranked], abs=1e-6)
    assert ranked[0].content == (DOCUMENTS[:2] + DOCUMENTS[3:])[int(np.argmax(expected))]


def test_llamaindex_tei_rerank_at_its_defaults(reranker):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    texts = DOCUMENTS[:2] + DOCUMENTS[3:]
    expected = seed_scores(reranker, texts)
    nodes = [NodeWithScore(node=TextNode(text=text), score=0.0) for text in texts]
    ranked = TextEmbeddingInference(base_url=reranker.url).postprocess_nodes(nodes, QueryBundle(QUERY))
    assert [node.score for node in ranked] == pytest.approx(sorted(expected, reverse=True), abs=1e-6)
    assert ranked[0].node.get_content() == texts[int(np.argmax(expected))]


def test_teis_rerank_scores_are_the_model_cards(reranker, qwen3_reranker_dir):
    """Against the Qwen3-Reranker model card's recipe, computed independently (tests/references.py): the score is
    P("yes"), and raw_scores its logit, log P(yes) - log P(no)."""
    from tests.references import DOCUMENTS as CARD_DOCUMENTS
    from tests.references import QUERY as CARD_QUERY
    from tests.references import card_scores

    expected = card_scores(qwen3_reranker_dir, qwen3_reranker_dir, CARD_QUERY, CARD_DOCUMENTS).tolist()
    ranks = tei_call(reranker, "/rerank", {"query": CARD_QUERY, "texts": CARD_DOCUMENTS})
    assert [rank["score"] for rank in ranks] == pytest.approx([expected[rank["index"]] for rank in ranks], abs=1e-4)
    raw = tei_call(reranker, "/rerank", {"query": CARD_QUERY, "texts": CARD_DOCUMENTS, "raw_scores": True})
    logits = [math.log(p / (1 - p)) for p in expected]
    assert [rank["score"] for rank in raw] == pytest.approx([logits[rank["index"]] for rank in raw], abs=1e-3)


# -- every protocol's error shape on one service, behind an API key ------------------------------------------

KEY = "a-key-for-the-shape-tests"
ITEMS = 4


@pytest.fixture(scope="module")
def keyed_reranker(request, tmp_path_factory):
    yield from serve_tiny(
        request, "qwen3_4b_rerank", tmp_path_factory, EMBED_API_KEY=KEY, EMBED_MAX_ITEMS_PER_REQUEST=str(ITEMS)
    )


def seed_shaped(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("error"), str) and "error_type" not in body


def openai_shaped(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


def tei_shaped(body: Any) -> bool:
    try:
        tei_schema("ErrorResponse").validate(body)
    except Exception:
        return False
    return set(body) == {"error", "error_type"}


SHAPES = {"seed": seed_shaped, "openai": openai_shaped, "tei": tei_shaped}
# route, its protocol, a good body, the name of its list of inputs, an item of that list
ROUTES: list[tuple[str, str, dict[str, Any], str, Any]] = [
    ("/rerank", "seed", {"query": QUERY, "documents": ["a cat"]}, "documents", "a cat"),
    ("/v1/rerank", "openai", {"query": QUERY, "documents": ["a cat"]}, "documents", "a cat"),
    ("/v2/rerank", "openai", {"query": QUERY, "documents": ["a cat"]}, "documents", "a cat"),
    ("/rerank", "tei", {"query": QUERY, "texts": ["a cat"]}, "texts", "a cat"),
    ("/tokenize", "tei", {"inputs": ["a cat"]}, "inputs", "a cat"),
    ("/decode", "tei", {"ids": [[1, 2]]}, "ids", [1, 2]),
]


def test_every_route_answers_bad_input_and_a_refused_key_in_its_own_protocols_shape(keyed_reranker):
    """Wrong types, empty inputs, too many inputs and a missing key, on every protocol of one service: each in the
    shape of the route's protocol (never a 5xx, never another protocol's); the good request then succeeds."""
    authorized = {"Authorization": f"Bearer {KEY}"}
    failures = []
    for path, protocol, good, field, item in ROUTES:
        cases = [
            ("no key", good, {}, 401),
            ("wrong key", good, {"Authorization": "Bearer wrong"}, 401),
            ("wrong type", {**good, field: 42}, authorized, 400),
            ("empty inputs", {**good, field: []}, authorized, 400),
            ("too many inputs", {**good, field: [item] * (ITEMS + 1)}, authorized, 413),
        ]
        for what, body, headers, status in cases:
            response = keyed_reranker.post(path, json=body, headers=headers)
            if response.status_code != status or not SHAPES[protocol](response.json()):
                failures.append(f"{path} ({protocol}) {what}: {response.status_code} {response.text[:200]}")
        assert keyed_reranker.post(path, json=good, headers=authorized).status_code == 200, path
    for path, protocol in (("/info", "tei"), ("/v1/models", "openai")):  # GET routes: the key alone
        response = keyed_reranker.get(path)
        if response.status_code != 401 or not SHAPES[protocol](response.json()):
            failures.append(f"GET {path} ({protocol}) no key: {response.status_code} {response.text[:200]}")
    assert_tei_error(keyed_reranker.post("/embed", json={"inputs": "a"}, headers=authorized), 424, "Backend")
    assert not failures, "\n".join(failures)
