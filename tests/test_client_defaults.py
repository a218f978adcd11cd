"""The clients people already use, at their defaults, against a real `bentoml serve` (tiny BGE):

- LangChain's OpenAIEmbeddings, which tokenizes with tiktoken (cl100k_base) and sends token ids, 1000 at a time;
- the openai client with OpenAI's 2048 inputs per request;
- Chroma's OpenAIEmbeddingFunction, which sends a whole `collection.add` in one request (1100 documents here);
- LlamaIndex's OpenAILikeEmbedding (/v1/embeddings) and TextEmbeddingsInference (TEI's /embed);
- huggingface_hub's InferenceClient against TEI's POST /embed (plus /tokenize and /info in TEI's shapes);
- per-request truncation (truncate=false, truncation_direction=left) and /tokenize/texts on every text path.

No network: tiktoken's cl100k_base file is replaced by a tiny encoding (conftest.py: all 256 bytes plus a few
merges, with cl100k_base's own pattern and special tokens), given to the service in EMBED_TIKTOKEN_DIR and to
the client process through tiktoken's own constructor.
"""

from __future__ import annotations

import logging

import httpx
import numpy as np
import openai
import pytest
import tiktoken
import tiktoken.registry
import tiktoken_ext.openai_public
import torch
from transformers import AutoTokenizer

from tests.conftest import BGE_SERVED_MAX_LENGTH, BGE_VOCAB_TEXT, TIKTOKEN_WORDS, tiny_cl100k_ranks
from tests.references import bge_reference

pytestmark = pytest.mark.serve

MAX_LENGTH = BGE_SERVED_MAX_LENGTH
CHARS = list(dict.fromkeys(BGE_VOCAB_TEXT))  # each one a token of the tiny BGE's vocabulary
TEXTS = TIKTOKEN_WORDS[:4]
LONG = "".join(CHARS[:40])  # 40 tokens + [CLS] and [SEP]


@pytest.fixture(scope="module")
def bge(bge_served):
    return bge_served


@pytest.fixture
def client_cl100k(monkeypatch):
    """The client process's cl100k_base: tiktoken's own constructor, with the tiny ranks instead of the download."""
    ranks = tiny_cl100k_ranks()
    monkeypatch.setattr(tiktoken_ext.openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: ranks)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    encoding = tiktoken.get_encoding("cl100k_base")
    assert encoding.encode_ordinary(TEXTS[3]) == [ranks[TEXTS[3].encode()]]  # the tiny ranks, not OpenAI's
    return encoding


def text_vectors(served, texts: list[str]) -> np.ndarray:
    answer = served.post("/embed/texts", json={"texts": texts})
    assert answer.status_code == 200, answer.text
    return np.array(answer.json()["embeddings"])


def seed_vectors(served, texts: list[str], per_request: int = 256) -> np.ndarray:
    """The seed path's vectors for any number of texts, at most `per_request` (its default cap) a request."""
    chunks = [texts[start : start + per_request] for start in range(0, len(texts), per_request)]
    return np.concatenate([text_vectors(served, chunk) for chunk in chunks])


def many_texts(count: int) -> list[str]:
    return [
        f"{TEXTS[index % len(TEXTS)]}{CHARS[index % len(CHARS)]}{CHARS[index // len(CHARS) % len(CHARS)]}"
        for index in range(count)
    ]


# -- LangChain, Chroma, LlamaIndex and OpenAI's limits---------------------------------------------------------------


def test_langchain_at_its_defaults_sends_token_ids_and_gets_the_text_vectors(bge, client_cl100k):
    from langchain_openai import OpenAIEmbeddings

    sent: list[dict] = []
    hooks = {"request": [lambda request: sent.append(__import__("json").loads(request.content))]}
    texts = many_texts(1100)  # over LangChain's chunk_size=1000: two requests, the first of 1000 inputs
    embeddings = OpenAIEmbeddings(
        model="bge_embed", base_url=f"{bge.url}/v1", api_key="unused", http_client=httpx.Client(event_hooks=hooks)
    )
    vectors = np.array(embeddings.embed_documents(texts))
    assert [len(body["input"]) for body in sent] == [1000, 100]
    assert all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in sent[0]["input"])
    assert sent[0]["input"][0] == client_cl100k.encode_ordinary(texts[0])
    expected = seed_vectors(bge, texts[:512])
    np.testing.assert_allclose(vectors[:512], expected, atol=1e-5)
    np.testing.assert_allclose(np.array(embeddings.embed_query(TEXTS[0])), text_vectors(bge, TEXTS[:1])[0], atol=1e-5)
    # And with check_embedding_ctx_length=False it sends the texts themselves, 1000 at a time.
    sent.clear()
    plain = OpenAIEmbeddings(
        model="bge_embed",
        base_url=f"{bge.url}/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
        http_client=httpx.Client(event_hooks=hooks),
    )
    np.testing.assert_allclose(np.array(plain.embed_documents(texts))[:512], expected, atol=1e-5)
    assert [len(body["input"]) for body in sent] == [1000, 100] and sent[0]["input"][0] == texts[0]


def test_openai_takes_2048_inputs_and_refuses_2049(bge):
    client = openai.OpenAI(base_url=f"{bge.url}/v1", api_key="unused", max_retries=0)
    texts = many_texts(2048)
    answer = client.embeddings.create(model="bge_embed", input=texts)
    assert [item.index for item in answer.data] == list(range(2048))
    np.testing.assert_allclose(np.array(answer.data[300].embedding), text_vectors(bge, texts[300:301])[0], atol=1e-5)
    with pytest.raises(openai.APIStatusError) as failure:
        client.embeddings.create(model="bge_embed", input=texts + ["猫"])
    assert failure.value.status_code == 413 and failure.value.body["param"] == "input"


def test_chroma_openai_embedding_function_adds_1100_documents_in_one_request(bge, monkeypatch):
    """Chroma's OpenAIEmbeddingFunction calls `client.embeddings.create(model=model_name, input=<every document>)`
    once per `collection.add` (chromadb/utils/embedding_functions/openai_embedding_function.py): its default model
    "text-embedding-ada-002", the openai client's default encoding (base64), and no `dimensions` for that model."""
    import chromadb
    from chromadb.config import Settings
    from chromadb.utils.embedding_functions import OpenAIEmbeddingFunction

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # it would take that key's place
    monkeypatch.setenv("CHROMA_OPENAI_API_KEY", "unused")
    function = OpenAIEmbeddingFunction(api_base=f"{bge.url}/v1")
    calls: list[dict] = []
    create = function.client.embeddings.create
    monkeypatch.setattr(function.client.embeddings, "create", lambda **kwargs: calls.append(kwargs) or create(**kwargs))
    collection = chromadb.EphemeralClient(Settings(anonymized_telemetry=False)).create_collection(
        "chroma-defaults", embedding_function=function
    )
    texts = many_texts(1100)
    ids = [f"doc-{index}" for index in range(len(texts))]
    collection.add(ids=ids, documents=texts)
    assert [(call["model"], len(call["input"])) for call in calls] == [("text-embedding-ada-002", 1100)]
    assert set(calls[0]) == {"model", "input"}  # no encoding_format, no dimensions: the openai client's defaults
    stored = collection.get(ids=ids[:300], include=["embeddings"])
    order = [ids.index(stored_id) for stored_id in stored["ids"]]
    np.testing.assert_allclose(np.array(stored["embeddings"]), seed_vectors(bge, texts[:300])[order], atol=1e-5)
    nearest = collection.query(query_texts=[texts[7]], n_results=1)
    assert nearest["ids"] == [[ids[7]]]


def test_llamaindex_openai_like_embedding_at_its_defaults(bge):
    """LlamaIndex's OpenAILikeEmbedding: 10 texts a request (embed_batch_size), newlines turned into spaces, so an
    empty chunk "\n" arrives as " ", which /v1 embeds as OpenAI does."""
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    embedding = OpenAILikeEmbedding(model_name="bge_embed", api_base=f"{bge.url}/v1", max_retries=0)
    texts = many_texts(25)
    vectors = np.array(embedding.get_text_embedding_batch([*texts, "\n"]))
    assert vectors.shape == (26, 48)
    np.testing.assert_allclose(vectors[:25], seed_vectors(bge, texts), atol=1e-5)
    query = np.array(embedding.get_query_embedding(TEXTS[1]))
    np.testing.assert_allclose(query, text_vectors(bge, TEXTS[1:2])[0], atol=1e-5)


def test_token_ids_errors_name_the_input_and_the_fix(bge, client_cl100k):
    ids = client_cl100k.encode_ordinary(TEXTS[1])
    single = bge.post("/v1/embeddings", json={"input": ids, "model": "text-embedding-3-small"})
    assert single.status_code == 200, single.text
    np.testing.assert_allclose(single.json()["data"][0]["embedding"], text_vectors(bge, TEXTS[1:2])[0], atol=1e-5)
    out_of_range = bge.post("/v1/embeddings", json={"input": [ids, [5, 10**6]]})
    assert out_of_range.status_code == 400 and out_of_range.json()["error"]["param"] == "input[1]"
    assert "1000000" in out_of_range.json()["error"]["message"]
    empty = bge.post("/v1/embeddings", json={"input": [ids, []]})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "input[1]"
    # text-davinci-003's encoding (p50k_base) is neither in EMBED_TIKTOKEN_DIR nor downloadable here.
    missing = bge.post("/v1/embeddings", json={"input": [ids], "model": "text-davinci-003"})
    assert missing.status_code == 400, missing.text
    message = missing.json()["error"]["message"]
    assert "p50k_base" in message and "TIKTOKEN_CACHE_DIR" in message and "check_embedding_ctx_length=False" in message


def test_blank_items_on_v1_are_embedded_as_openai_does_but_the_seed_paths_stay_strict(bge):
    answer = bge.post("/v1/embeddings", json={"input": ["猫", " ", "\n"]})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"]) == 3
    for body, param in [({"input": ["猫", ""]}, "input[1]"), ({"input": " "}, "input"), ({"input": [" "]}, "input[0]")]:
        refused = bge.post("/v1/embeddings", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, (body, refused.text)
    seed = bge.post("/embed/texts", json={"texts": ["猫", " "]})
    assert seed.status_code == 400 and seed.json()["param"] == "texts[1]"


# -- truncation control and /tokenize ------------------------------------------------------------------------


def test_truncation_is_controlled_per_request_on_every_text_path(bge, bge_dir):
    room = MAX_LENGTH - 2  # [CLS] and [SEP]
    right, left = bge_reference(bge_dir, [LONG[:room], LONG[-room:]])
    assert not torch.allclose(right, left, atol=1e-3)  # the two cuts read different tokens
    paths = [
        ("/embed/text", lambda extra: {"text": LONG, **extra}, lambda body: body["embedding"], "text"),
        (
            "/embed/texts",
            lambda extra: {"texts": ["猫", LONG], **extra},
            lambda body: body["embeddings"][1],
            "texts[1]",
        ),
        (
            "/v1/embeddings",
            lambda extra: {"input": ["猫", LONG], **extra},
            lambda body: body["data"][1]["embedding"],
            "input[1]",
        ),
        ("/embed", lambda extra: {"inputs": ["猫", LONG], **extra}, lambda body: body[1], "inputs[1]"),
    ]
    for path, body, vector, name in paths:
        for extra, expected in [({}, right), ({"truncation_direction": "left"}, left)]:
            answer = bge.post(path, json=body(extra))
            assert answer.status_code == 200, (path, answer.text)
            assert torch.allclose(torch.tensor(vector(answer.json())), expected, atol=1e-5), (path, extra)
        refused = bge.post(path, json=body({"truncate": False}))
        assert refused.status_code == (422 if path == "/embed" else 413), (path, refused.text)  # TEI says 422
        message = refused.text
        assert f"`{name}` is {len(LONG) + 2} tokens long" in message and str(MAX_LENGTH) in message, (path, message)
    fits = bge.post("/embed/texts", json={"texts": [LONG[:room]], "truncate": False})
    assert fits.status_code == 200
    # A text far beyond what max_length tokens can cover is refused without being tokenized whole.
    huge = bge.post("/embed/text", json={"text": LONG * 2_500, "truncate": False})
    assert huge.status_code == 413 and "is at least" in huge.json()["error"], huge.text[:300]


def test_tokenize_gives_the_models_own_tokens(bge, bge_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(bge_dir))
    instruction = "为这个句子生成表示以用于检索相关文章："
    answer = bge.post("/tokenize/texts", json={"texts": [TEXTS[0], LONG], "instruction": instruction})
    assert answer.status_code == 200, answer.text
    first, long = answer.json()["results"]
    expected = tokenizer(instruction + TEXTS[0], truncation=True, max_length=MAX_LENGTH)["input_ids"]
    assert first["ids"] == expected and first["count"] == len(expected)
    assert first["tokens"] == tokenizer.convert_ids_to_tokens(expected)
    assert long["count"] == MAX_LENGTH
    assert long["ids"] == tokenizer(instruction + LONG, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    left = bge.post("/tokenize/texts", json={"texts": [LONG], "truncation_direction": "left"}).json()["results"][0]
    assert left["tokens"] == ["[CLS]", *LONG[-(MAX_LENGTH - 2) :], "[SEP]"]


# -- TEI's API -------------------------------------------------------------------------------------------------


def test_huggingface_hub_inference_client_embeds_through_tei_embed(bge, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # CI runs with HF_HUB_OFFLINE=1 (no hub); this client only reaches the local server.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(model=f"{bge.url}/embed")
    vectors = client.feature_extraction(TEXTS)
    np.testing.assert_allclose(vectors, text_vectors(bge, TEXTS), atol=1e-5)
    one = client.feature_extraction(TEXTS[0], truncate=True, truncation_direction="left")
    assert one.shape == (1, 48)
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as failure:
        client.feature_extraction(LONG, truncate=False)
    assert failure.value.response.status_code == 422  # TEI's status for a text over max_input_length
    assert failure.value.response.json() == {
        "error": f"`inputs` is {len(LONG) + 2} tokens long; this model reads at most {MAX_LENGTH}",
        "error_type": "Validation",
    }


def test_llamaindex_text_embeddings_inference_at_its_defaults(bge):
    """LlamaIndex's TextEmbeddingsInference posts {"inputs": [...], "truncate": true} to /embed, 10 texts a request;
    for a model name it does not know (the service's own), it adds no instruction of its own (it does for the
    BGE and Instructor names it lists)."""
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    embedding = TextEmbeddingsInference(model_name="bge_embed", base_url=bge.url)
    texts = [*many_texts(24), LONG]  # LONG is over max_length: TEI's truncate=true cuts it, as the seed path does
    vectors = np.array(embedding.get_text_embedding_batch(texts))
    np.testing.assert_allclose(vectors, seed_vectors(bge, texts), atol=1e-5)
    query = np.array(embedding.get_query_embedding(TEXTS[2]))
    np.testing.assert_allclose(query, text_vectors(bge, TEXTS[2:3])[0], atol=1e-5)


def test_tei_tokenize_info_and_errors_in_teis_shapes(bge, bge_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(bge_dir))
    answer = bge.post("/tokenize", json={"inputs": "一只猫"})
    assert answer.status_code == 200, answer.text
    [tokens] = answer.json()
    ids = tokenizer("一只猫")["input_ids"]
    assert [token["id"] for token in tokens] == ids
    assert tokens[0] == {"id": ids[0], "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert tokens[1] == {"id": ids[1], "text": "一", "special": False, "start": 0, "stop": 1}
    bare = bge.post("/tokenize", json={"inputs": ["一只猫"], "add_special_tokens": False}).json()
    assert [token["text"] for token in bare[0]] == ["一", "只", "猫"]
    info = bge.get("/info").json()
    assert info["model_id"] == "bge_embed" and info["max_input_length"] == MAX_LENGTH
    assert info["model_type"] == {"embedding": {"pooling": "cls"}}
    for body in [{"inputs": []}, {"inputs": ["猫", " "]}, {"inputs": "猫", "normalize": False}, {"input": "猫"}]:
        refused = bge.post("/embed", json=body)
        assert refused.status_code == 400, (body, refused.text)
        expected = "Empty" if body == {"inputs": []} else "Validation"  # TEI's error_type for an empty batch
        assert set(refused.json()) == {"error", "error_type"} and refused.json()["error_type"] == expected
    # The seed's /embed/text is still its own API beside TEI's /embed.
    assert bge.post("/embed/text", json={"text": "猫"}).json()["dimension"] == 48


def test_the_registry_tells_each_route_its_protocol():
    """The middleware and the error renderer ask the registry; TEI's /rerank and the seed's share a path and are
    told apart by the body."""
    from embed_http.cohere import COHERE
    from embed_http.openai import OPENAI
    from embed_http.registry import Routing
    from embed_http.seed import SEED
    from embed_http.tei import TEI_PROTOCOL

    text = Routing("text_embedding", (OPENAI, TEI_PROTOCOL))
    assert text.protocol_of("/embed") is TEI_PROTOCOL and text.protocol_of("/info") is TEI_PROTOCOL
    assert text.protocol_of("/v1/embeddings") is OPENAI and text.protocol_of("/v1/models/bge_embed") is OPENAI
    assert text.protocol_of("/v1/chat/completions") is OPENAI  # an unknown path in OpenAI's namespace
    assert text.protocol_of("/embed/text") is SEED and text.protocol_of("/rerank") is SEED
    rerank = Routing("rerank", (OPENAI, COHERE, TEI_PROTOCOL))
    assert rerank.is_shared("/rerank") and not text.is_shared("/rerank")
    assert rerank.protocol_of("/rerank", {"query": "a", "texts": ["b"]}) is TEI_PROTOCOL
    assert rerank.protocol_of("/rerank", {"query": "a", "documents": ["b"]}) is SEED
    assert rerank.protocol_of("/rerank", None) is SEED  # a body that is not JSON: the path's own protocol
    assert rerank.protocol_of("/v1/rerank") is COHERE and rerank.protocol_of("/embed") is TEI_PROTOCOL


# -- logs: a client's mistake is one WARNING line ---------------------------------------------------------------


def test_client_errors_are_logged_as_one_line_without_a_traceback(bge):
    before = bge.log_path.read_text(errors="replace")
    refused = bge.post("/embed/texts", json={"texts": ["猫"], "dimensions": "8"})  # BentoML's own validation 400
    assert refused.status_code == 400
    assert bge.post("/health").status_code in (404, 405)  # one more request, so the log is flushed past the 400
    added = bge.log_path.read_text(errors="replace")[len(before) :]
    assert "client error 400" in added and "/embed/texts" in added, added
    assert "Traceback" not in added and "ERROR" not in added, added


def test_server_errors_keep_their_level_and_traceback():
    from embed_http.logs import ClientErrorsAsWarnings

    def record_for(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            import sys

            return logging.LogRecord("x", logging.ERROR, __file__, 1, "Exception on %s", ("/rerank",), sys.exc_info())

    from pydantic import BaseModel, ValidationError

    class Model(BaseModel):
        top_k: int

    try:
        Model(top_k="a private text")
    except ValidationError as exc:
        client = record_for(exc)
    server = record_for(RuntimeError("boom"))
    for record in (client, server):
        assert ClientErrorsAsWarnings().filter(record)
    assert client.levelno == logging.WARNING and client.exc_info is None and "\n" not in client.getMessage()
    assert "top_k" in client.getMessage() and "private" not in client.getMessage()  # what was wrong, not what was sent
    assert server.levelno == logging.ERROR and server.exc_info is not None
