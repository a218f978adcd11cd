"""Clients against real `bentoml serve` processes: the Cohere SDK on /v1/rerank and /v2/rerank (Cohere/Jina
shape), the project's own embed_client, and the seed README's example code, run unchanged."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import cohere
import httpx
import pytest
import torch

import embed_client
from embed_client import BadRequest, EmbedClient, RerankHit, ServiceBusy, Unauthorized, Unreachable
from tests.conftest import REPO, serve
from tests.references import DOCUMENTS, QUERY, bge_reference, card_scores

pytestmark = pytest.mark.serve

ITEM_LIMIT = 8
SEED_README = REPO.parent / "shared" / "seed" / "README.zh.md"
SEED_EXAMPLE = Path(__file__).with_name("seed_readme_example.py.txt")  # the seed README's Python example, verbatim


def own_home(tmp_path_factory) -> dict[str, str]:
    """A BENTOML_HOME per server: BentoML empties $BENTOML_HOME/prometheus_multiproc_dir when a server starts."""
    return {"BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml-home"))}


@pytest.fixture(scope="module")
def rerank_4b(zimage_root, tmp_path_factory):
    env = {
        "QWEN3_4B_RERANK_MODEL": str(zimage_root),
        "EMBED_MAX_ITEMS_PER_REQUEST": str(ITEM_LIMIT),
        **own_home(tmp_path_factory),
    }
    yield from serve("Qwen3Rerank4B", env, tmp_path_factory.mktemp("logs") / "rerank4b_clients.log")


@pytest.fixture(scope="module")
def bge(bge_served):
    return bge_served  # shared with tests/test_client_defaults.py (conftest.py)


@pytest.fixture(scope="module")
def expected_scores(zimage_root) -> list[float]:
    """The model card's scores for (QUERY, DOCUMENTS), computed independently of the service."""
    return card_scores(zimage_root / "text_encoder", zimage_root / "tokenizer", QUERY, DOCUMENTS).tolist()


def best_first(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda index: -scores[index])


# -- Cohere SDK -------------------------------------------------------------------------------------------


def test_cohere_v1_client_reranks(rerank_4b, expected_scores):
    co = cohere.Client(api_key="unused", base_url=rerank_4b.url)  # posts to {base_url}/v1/rerank
    answer = co.rerank(model="qwen3_4b_rerank", query=QUERY, documents=DOCUMENTS, top_n=3, return_documents=True)
    assert [result.index for result in answer.results] == best_first(expected_scores)[:3]
    for result in answer.results:
        assert abs(result.relevance_score - expected_scores[result.index]) < 1e-4
        assert result.document.text == DOCUMENTS[result.index]
    bare = co.rerank(model="m", query=QUERY, documents=DOCUMENTS[:3], return_documents=False)
    assert len(bare.results) == 3 and all(result.document is None for result in bare.results)


def test_cohere_v2_client_reranks(rerank_4b, expected_scores):
    co = cohere.ClientV2(api_key="unused", base_url=rerank_4b.url)  # posts to {base_url}/v2/rerank
    answer = co.rerank(model="qwen3_4b_rerank", query=QUERY, documents=DOCUMENTS, top_n=2)
    assert [result.index for result in answer.results] == best_first(expected_scores)[:2]
    for result in answer.results:
        assert abs(result.relevance_score - expected_scores[result.index]) < 1e-4


def test_cohere_client_raises_on_bad_input(rerank_4b):
    co = cohere.Client(api_key="unused", base_url=rerank_4b.url)
    with pytest.raises(cohere.errors.BadRequestError) as failure:
        co.rerank(model="m", query="  ", documents=["a"])
    assert failure.value.body["error"]["param"] == "query"


# -- Jina's clients ------------------------------------------------------------------------------------------


def test_langchain_jina_rerank_reranks_and_shows_the_services_message(rerank_4b, expected_scores, monkeypatch):
    """LangChain-community's JinaRerank posts to its module's JINA_API_URL and raises RuntimeError(body["detail"])
    on any answer without results (LlamaIndex's JinaRerank reads the same field)."""
    from langchain_community.document_compressors import jina_rerank

    monkeypatch.setattr(jina_rerank, "JINA_API_URL", f"{rerank_4b.url}/v1/rerank")
    reranker = jina_rerank.JinaRerank(jina_api_key="unused", model="qwen3_4b_rerank")
    results = reranker.rerank(DOCUMENTS, QUERY, top_n=3)
    assert [result["index"] for result in results] == best_first(expected_scores)[:3]
    assert all(abs(r["relevance_score"] - expected_scores[r["index"]]) < 1e-4 for r in results)
    with pytest.raises(RuntimeError) as failure:
        reranker.rerank(["a"] * (ITEM_LIMIT + 1), QUERY)
    assert str(failure.value) == f"`documents` holds {ITEM_LIMIT + 1} items; at most {ITEM_LIMIT} per request"


def test_llamaindex_jina_rerank_reranks_and_shows_the_services_message(rerank_4b, expected_scores):
    """LlamaIndex's JinaRerank posts to {base_url}/rerank and raises RuntimeError(body["detail"]) without results."""
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    reranker = JinaRerank(base_url=f"{rerank_4b.url}/v1", api_key="unused", model="qwen3_4b_rerank", top_n=3)
    nodes = [NodeWithScore(node=TextNode(text=document, id_=str(index))) for index, document in enumerate(DOCUMENTS)]
    results = reranker.postprocess_nodes(nodes, query_str=QUERY)
    assert [int(result.node.node_id) for result in results] == best_first(expected_scores)[:3]
    assert all(abs(result.score - expected_scores[int(result.node.node_id)]) < 1e-4 for result in results)
    too_many = [NodeWithScore(node=TextNode(text="a")) for _ in range(ITEM_LIMIT + 1)]
    with pytest.raises(RuntimeError) as failure:
        reranker.postprocess_nodes(too_many, query_str=QUERY)
    assert str(failure.value) == f"`documents` holds {ITEM_LIMIT + 1} items; at most {ITEM_LIMIT} per request"


def test_a_validation_400_on_rerank_is_one_warning_line(rerank_4b):
    before = rerank_4b.log_path.read_text(errors="replace")
    refused = rerank_4b.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_k": "2"})
    assert refused.status_code == 400
    assert rerank_4b.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS[:1]}).status_code == 200
    added = rerank_4b.log_path.read_text(errors="replace")[len(before) :]
    assert "client error 400" in added and "/rerank" in added, added
    assert "Traceback" not in added and "ERROR" not in added, added


# -- the /v1/rerank shape over plain HTTP -------------------------------------------------------------------


def test_v1_rerank_shape_document_objects_and_scores(rerank_4b, expected_scores):
    documents = [{"text": text, "id": f"doc-{index}"} for index, text in enumerate(DOCUMENTS)]
    answer = rerank_4b.post("/v1/rerank", json={"query": QUERY, "documents": documents})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == "qwen3_4b_rerank" and isinstance(body["id"], str)
    results = body["results"]
    assert [r["index"] for r in results] == best_first(expected_scores)  # every document, best first
    for result in results:
        assert set(result) == {"index", "relevance_score", "document"}
        assert result["document"] == documents[result["index"]]  # the object comes back whole (Cohere)
        assert abs(result["relevance_score"] - expected_scores[result["index"]]) < 1e-4
    # The seed path gives the same scores for the same pairs.
    seed = rerank_4b.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS}).json()["results"]
    assert [r["original_index"] for r in seed] == [r["index"] for r in results]
    v2 = rerank_4b.post("/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS[:2]}).json()["results"]
    assert all(set(r) == {"index", "relevance_score"} for r in v2)  # Cohere v2 never returns documents


BAD_RERANK = [
    ("missing query", {"documents": ["a"]}, 400, "query"),
    ("blank query", {"query": " ", "documents": ["a"]}, 400, "query"),
    ("documents not a list", {"query": "q", "documents": "a"}, 400, "documents"),
    ("empty documents", {"query": "q", "documents": []}, 400, "documents"),
    ("object without text", {"query": "q", "documents": [{"title": "a"}]}, 400, "documents.0"),
    ("number as document", {"query": "q", "documents": ["a", 5]}, 400, "documents.1"),
    ("top_n zero", {"query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n"),
    ("top_n not a number", {"query": "q", "documents": ["a"], "top_n": "2"}, 400, "top_n"),
    ("too many documents", {"query": "q", "documents": ["a"] * (ITEM_LIMIT + 1)}, 413, "documents"),
]


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD_RERANK)
def test_v1_rerank_bad_input_gets_openai_shaped_errors(rerank_4b, case, body, status, param):
    answer = rerank_4b.post("/v1/rerank", json=body)
    assert answer.status_code == status, (case, answer.text)
    error = answer.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param), (case, error)
    assert error["type"] == "invalid_request_error" and error["message"]


def test_rerank_metrics_count_pairs(rerank_4b):
    def pairs() -> float:
        text = rerank_4b.get("/metrics").text
        found = re.search(r'^embed_items_total\{item="pair",service="qwen3_4b_rerank"\} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    before = pairs()
    assert rerank_4b.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS[:3]}).status_code == 200
    assert pairs() - before == 3


# -- embed_client against running services -----------------------------------------------------------------


def test_embed_client_text_functions(bge, bge_dir):
    texts = ["一只橙色的猫在阳光下晒太阳", "黑狗在草地上奔跑"]
    with EmbedClient(bge.url) as client:
        vector = client.get_embedding(texts[0])
        assert torch.allclose(torch.tensor(vector), bge_reference(bge_dir, texts[:1])[0], atol=1e-5)
        assert torch.allclose(torch.tensor(client.embed_texts(texts)), bge_reference(bge_dir, texts), atol=1e-5)
        with pytest.raises(BadRequest) as failure:
            client.embed_texts(["ok", ""])
        assert failure.value.status == 400 and failure.value.param == "texts[1]"
        assert client.health()["service"] == "bge_embed"


def test_embed_client_rerank_and_score(rerank_4b, expected_scores):
    with EmbedClient(rerank_4b.url) as client:
        hits = client.rerank(QUERY, DOCUMENTS, top_k=2)
        assert [hit.original_index for hit in hits] == best_first(expected_scores)[:2]
        assert all(isinstance(hit, RerankHit) and hit.document == DOCUMENTS[hit.original_index] for hit in hits)
        assert abs(client.score(QUERY, DOCUMENTS[0]) - expected_scores[0]) < 1e-4
        with pytest.raises(BadRequest) as failure:
            client.rerank(QUERY, ["a"] * (ITEM_LIMIT + 1))
        assert failure.value.status == 413 and failure.value.param == "documents"


def test_module_functions_take_a_port(bge, monkeypatch):
    port = int(bge.url.rsplit(":", 1)[1])
    monkeypatch.setattr(embed_client.client, "DEFAULT_HOST", "http://127.0.0.1")
    monkeypatch.setattr(embed_client.client, "_clients", {})
    assert len(embed_client.get_embedding("一只猫", port=port)) == 48


def scripted(*answers: httpx.Response | Exception) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport that gives these answers in turn and records the requests."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handle), seen


def test_client_retries_503_and_429_then_succeeds():
    transport, seen = scripted(
        httpx.Response(503, json={"error": "busy"}),
        httpx.Response(429, json={"error": "slow down"}, headers={"Retry-After": "0"}),
        httpx.Response(200, json={"score": 0.75}),
    )
    client = EmbedClient("http://service", transport=transport, retries=3, backoff=0.0, api_key="k")
    assert client.score("q", "d") == 0.75
    assert len(seen) == 3 and seen[0].headers["authorization"] == "Bearer k"


def test_client_gives_up_after_its_retries():
    transport, seen = scripted(*[httpx.Response(503, json={"error": "out of memory"})] * 3)
    client = EmbedClient("http://service", transport=transport, retries=2, backoff=0.0)
    with pytest.raises(ServiceBusy) as failure:
        client.get_embedding("a")
    assert len(seen) == 3 and failure.value.status == 503 and "out of memory" in str(failure.value)


def test_client_retries_a_refused_connection_but_not_a_read_timeout():
    """A request that timed out may still be computing: sending it again would only add work."""
    transport, seen = scripted(
        httpx.ConnectError("refused"), httpx.Response(200, json={"embedding": [1.0], "dimension": 1})
    )
    assert EmbedClient("http://service", transport=transport, retries=2, backoff=0.0).get_embedding("a") == [1.0]
    assert len(seen) == 2
    transport, seen = scripted(
        httpx.ReadTimeout("slow"), httpx.Response(200, json={"embedding": [1.0], "dimension": 1})
    )
    with pytest.raises(Unreachable):
        EmbedClient("http://service", transport=transport, retries=2, backoff=0.0).get_embedding("a")
    assert len(seen) == 1


def test_client_does_not_retry_bad_requests_and_reads_both_error_shapes():
    openai_shaped = {"error": {"message": "bad key", "type": "authentication_error", "param": None, "code": "x"}}
    transport, seen = scripted(
        httpx.Response(400, json={"error": "`text` must be a non-empty string", "param": "text"}),
        httpx.Response(401, json=openai_shaped),
    )
    client = EmbedClient("http://service", transport=transport, backoff=0.0)
    with pytest.raises(BadRequest) as failure:
        client.get_embedding("")
    assert failure.value.param == "text" and len(seen) == 1
    with pytest.raises(Unauthorized) as failure:
        client.get_embedding("a")
    assert failure.value.message == "bad key"


def test_client_reports_an_unreachable_service():
    transport, seen = scripted(httpx.ConnectError("refused"), httpx.ConnectError("refused"))
    client = EmbedClient("http://service", transport=transport, retries=1, backoff=0.0)
    with pytest.raises(Unreachable):
        client.health()
    assert len(seen) == 2


# -- the seed README's example, unchanged but for the URLs --------------------------------------------------


def test_the_stored_example_is_the_seed_readmes():
    example = SEED_EXAMPLE.read_text(encoding="utf-8")
    assert "def get_embedding_8b" in example and "def rerank_8b" in example
    if SEED_README.exists():  # next to a checkout of the project; CI has the stored copy only
        assert example in SEED_README.read_text(encoding="utf-8")


def test_seed_readme_example_runs_unchanged(bge, rerank_4b):
    code = SEED_EXAMPLE.read_text(encoding="utf-8")
    code = code.replace("http://localhost:6014", bge.url).replace("http://localhost:6015", rerank_4b.url)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "seed_readme_example", "exec"), {"__name__": "seed_example"})
    lines = printed.getvalue().splitlines()
    assert lines[0] == "嵌入维度: 48"  # the tiny BGE's dimension
    assert len(lines) == 3  # top_k=2 results
    for line in lines[1:]:
        assert re.fullmatch(r"\[[012]\] \d+\.\d\d% - (橙猫晒太阳|黑狗跑步|白猫睡觉)", line), line
