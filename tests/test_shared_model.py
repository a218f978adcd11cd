"""One Qwen3-4B behind both 4B ports: the reranker runs on the embedding service's copy of the model
(runners/forward.py, embed_http/shared_model.py, embed_ops/sharing.py).

The scores are checked against the Qwen3-Reranker model card's recipe written in tests/references.py, and against
a reranker holding its own copy; "one load" is checked by what the sharing side holds (no model) and by what it
does when the holder is gone (it cannot answer alone)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import torch

from embed_core.config import RunnerConfig
from embed_core.errors import ModelLoadError, Overloaded
from embed_core.table import SERVICES
from tests.conftest import REPO, free_port, serve
from tests.references import DOCUMENTS, QUERY, card_scores, check_ranking_against_card

EMBED, RERANK = SERVICES["qwen3_4b_embed"], SERVICES["qwen3_4b_rerank"]


@pytest.fixture
def cpu_env(monkeypatch, zimage_root):
    for spec in (EMBED, RERANK):
        monkeypatch.setenv(spec.model_env, str(zimage_root))
    monkeypatch.setenv("EMBED_DEVICE", "cpu")
    monkeypatch.setenv("EMBED_QUANTIZATION", "none")


def test_a_reranker_on_the_embedding_runners_model_scores_as_its_own_copy(cpu_env, zimage_root):
    from runners.embedder import TextEmbedder
    from runners.reranker import Reranker

    embedder = TextEmbedder(EMBED, RunnerConfig.from_env(EMBED))
    shared = Reranker(RERANK, RunnerConfig.from_env(RERANK), shared=embedder.forward)
    own = Reranker(RERANK, RunnerConfig.from_env(RERANK))
    try:
        assert shared.model is None and own.model is not None  # the sharing reranker loaded no weights
        shared_scores = torch.tensor(asyncio.run(shared.score(QUERY, DOCUMENTS)))
        own_scores = torch.tensor(asyncio.run(own.score(QUERY, DOCUMENTS)))
        card = card_scores(zimage_root / "text_encoder", zimage_root / "tokenizer", QUERY, DOCUMENTS)
        assert torch.allclose(shared_scores, own_scores, atol=1e-6, rtol=0), (shared_scores, own_scores)
        assert torch.allclose(shared_scores, card.float(), atol=1e-4, rtol=0), (shared_scores, card)
        # And the embedding service's own vectors are what they were: the shared passes do not disturb its queue.
        before = asyncio.run(embedder.embed(["一只橙色的猫"]))
        asyncio.run(shared.score(QUERY, DOCUMENTS[:2]))
        assert asyncio.run(embedder.embed(["一只橙色的猫"])) == before
    finally:
        for runner in (embedder, shared, own):
            runner.close()


def test_only_the_tables_sharing_service_may_name_a_model_host(monkeypatch):
    from embed_http.shared_model import model_host

    monkeypatch.setenv(RERANK.model_host_env, "http://127.0.0.1:6011/")
    assert model_host(RERANK) == "http://127.0.0.1:6011"
    monkeypatch.setenv(RERANK.model_host_env, "127.0.0.1:6011")
    with pytest.raises(ModelLoadError, match="must be an http:// or https:// address"):
        model_host(RERANK)
    eight = SERVICES["qwen3_8b_rerank"]
    monkeypatch.setenv(eight.model_host_env, "http://127.0.0.1:6011")
    with pytest.raises(ModelLoadError, match="qwen3_8b_rerank cannot share another service's model; only qwen3_4b"):
        model_host(eight)


def test_the_launcher_shares_only_the_same_weights(monkeypatch, zimage_root):
    from embed_ops.sharing import shared_model_env

    ports = {"qwen3_4b_embed": 7011, "qwen3_4b_rerank": 7013, "siglip2_embed": 7010}
    names = list(ports)
    for key in ("EMBED_QUANTIZATION", "EMBED_DEVICE", EMBED.model_env, RERANK.model_env):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv(RERANK.model_host_env, raising=False)
    assert shared_model_env(names, ports, os.environ) == {RERANK.model_host_env: "http://127.0.0.1:7011"}
    assert shared_model_env(["qwen3_4b_rerank"], ports, os.environ) == {}  # its holder is not started
    monkeypatch.setenv(RERANK.quantization_env, "int8")  # the two would hold different weights
    assert shared_model_env(names, ports, os.environ) == {}
    monkeypatch.delenv(RERANK.quantization_env)
    monkeypatch.setenv(RERANK.model_env, str(zimage_root))  # another checkpoint than the embedding service's
    assert shared_model_env(names, ports, os.environ) == {}
    monkeypatch.setenv(EMBED.model_env, str(zimage_root))
    monkeypatch.setenv(RERANK.model_host_env, "")  # the user's own value, even empty (two copies), is kept
    assert shared_model_env(names, ports, os.environ) == {}


def test_the_light_profiles_plan_shares_the_4b_and_counts_one_copy(tmp_path):
    """The plan the start script follows: the reranker gets the embedding service's address, and the estimate
    counts Qwen3-4B's weights once."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("QWEN3_", "EMBED_"))}
    result = subprocess.run(
        [sys.executable, "-m", "embed_ops.launcher", "plan", "--run-dir", str(tmp_path), "--profile", "light"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"env\t{RERANK.model_host_env}\thttp://127.0.0.1:{EMBED.port}" in result.stdout.splitlines()
    assert "qwen3_4b_rerank runs on qwen3_4b_embed's copy of the model" in result.stderr


# -- over HTTP: two real `bentoml serve` processes ------------------------------------------------------------


@pytest.fixture(scope="module")
def embed_4b(zimage_root, tmp_path_factory):
    env = {EMBED.model_env: str(zimage_root), "EMBED_QUANTIZATION": "none"}
    yield from serve(EMBED.class_name, env, tmp_path_factory.mktemp("logs") / "embed4b.log")


@pytest.fixture(scope="module")
def shared_rerank_4b(zimage_root, embed_4b, tmp_path_factory):
    env = {RERANK.model_env: str(zimage_root), "EMBED_QUANTIZATION": "none", RERANK.model_host_env: embed_4b.url}
    yield from serve(RERANK.class_name, env, tmp_path_factory.mktemp("logs") / "rerank4b-shared.log")


@pytest.mark.serve
def test_the_shared_reranker_answers_as_the_model_card_over_http(shared_rerank_4b, embed_4b, zimage_root):
    health = shared_rerank_4b.get("/health").json()
    assert (
        health["service"] == "qwen3_4b_rerank" and health["weights"] == f"shared with qwen3_4b_embed at {embed_4b.url}"
    )
    card = card_scores(zimage_root / "text_encoder", zimage_root / "tokenizer", QUERY, DOCUMENTS)
    response = shared_rerank_4b.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    assert response.status_code == 200, response.text
    check_ranking_against_card(response.json()["results"], card)
    # The holder's own routes are untouched by the shared passes.
    assert embed_4b.post("/embed/text", json={"text": "一只橙色的猫"}).status_code == 200
    assert embed_4b.get("/health").json()["weights"] == "in this process"


@pytest.mark.serve
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"token_ids": [[1, 2]], "pooling": "max"}, "pooling"),
        ({"token_ids": [], "pooling": "last"}, "token_ids"),
        ({"token_ids": [[1], []], "pooling": "last"}, "token_ids[1]"),
        ({"token_ids": [[1, 10**9]], "pooling": "last"}, "token_ids[0]"),
        ({"token_ids": [[1, -1]], "pooling": "last"}, "token_ids[0]"),
        ({"token_ids": [[1, 2]], "pooling": "last", "vocabulary_rows": [10**9]}, "vocabulary_rows"),
        ({"token_ids": [[1, 2]], "pooling": "last", "vocabulary_rows": list(range(17))}, "vocabulary_rows"),
    ],
)
def test_the_holder_refuses_a_pass_it_cannot_run(embed_4b, body, param):
    response = embed_4b.post("/shared/forward", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["param"] == param


@pytest.mark.serve
def test_the_holders_pass_is_the_pooled_state_or_the_rows_logits(embed_4b, zimage_root):
    """Against transformers' own Qwen3Model, the last token's final hidden state and its dot with two rows of the
    tied embedding matrix."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(zimage_root / "text_encoder")).eval()
    ids = [[5, 9, 14, 3], [7, 2]]
    with torch.no_grad():
        last = torch.stack([model(input_ids=torch.tensor([row])).last_hidden_state[0, -1] for row in ids])
    rows = model.get_input_embeddings().weight[[4, 11]]
    pooled = embed_4b.post("/shared/forward", json={"token_ids": ids, "pooling": "last"}).json()
    assert pooled["positions"] == 6
    assert torch.allclose(torch.tensor(pooled["values"]), last, atol=1e-4)
    logits = embed_4b.post("/shared/forward", json={"token_ids": ids, "pooling": "last", "vocabulary_rows": [4, 11]})
    assert torch.allclose(torch.tensor(logits.json()["values"]), last @ rows.T, atol=1e-4)


@pytest.mark.serve
def test_without_its_holder_the_sharing_service_says_so_and_keeps_serving(zimage_root, tmp_path_factory):
    """No copy of its own: with nothing at its MODEL_HOST it cannot score, and says where it looked (a 503 with
    Retry-After, never a 500), and keeps answering /health."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = {RERANK.model_env: str(zimage_root), "EMBED_QUANTIZATION": "none", RERANK.model_host_env: dead}
    for served in serve(RERANK.class_name, env, tmp_path_factory.mktemp("logs") / "orphan.log"):
        response = served.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS[:2]})
        assert response.status_code == 503, response.text
        assert f"the shared model (qwen3_4b_embed at {dead}) is not answering" in response.json()["error"]
        assert response.headers["Retry-After"].isdigit()
        assert served.get("/health").status_code == 200


def test_a_holder_of_another_checkpoint_or_quantization_is_refused_not_used():
    """Pointed by hand at a service holding another checkpoint (or the same one quantized otherwise), the sharing
    side refuses every pass, naming both, rather than score with another model."""
    import httpx

    from embed_http.shared_model import SharedModelClient

    passes = []

    def holder(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"model": "/models/other", "quantization": "none"})
        passes.append(request)
        return httpx.Response(200, json={"values": [[0.0, 0.0]], "positions": 2})

    for model, quantization in (("/models/mine", "none"), ("/models/other", "int8")):
        client = SharedModelClient(RERANK, "http://holder", model, quantization)
        client._client = httpx.Client(base_url="http://holder", transport=httpx.MockTransport(holder))
        with pytest.raises(Overloaded) as refused:
            client.run([[1, 2]], "last", [4, 11])
        assert "'/models/other' (none)" in str(refused.value) and f"{model!r} ({quantization})" in str(refused.value)
    assert passes == []  # not one pass ran on the wrong model
    client = SharedModelClient(RERANK, "http://holder", "/models/other", "none")
    client._client = httpx.Client(base_url="http://holder", transport=httpx.MockTransport(holder))
    values, positions = client.run([[1, 2]], "last", [4, 11])
    assert values.tolist() == [[0.0, 0.0]] and positions == 2 and len(passes) == 1


def test_the_holders_route_needs_the_key_and_the_sharing_service_sends_it(monkeypatch):
    from embed_http.shared_model import SharedModelClient

    monkeypatch.setenv("QWEN3_4B_EMBED_API_KEY", "s3cret")
    client = SharedModelClient(RERANK, "http://127.0.0.1:9", "m", "none")
    assert client._client.headers["Authorization"] == "Bearer s3cret"
    with pytest.raises(Overloaded, match="is not answering"):
        client.run([[1, 2]], "last", [4, 11])


def test_a_holder_that_unloaded_when_idle_loads_again_for_a_shared_pass(cpu_env, monkeypatch):
    """A pass asked by the sharing service is a request like any other: it loads the model again, and is answered
    as before the unload."""
    import weakref

    from runners.embedder import TextEmbedder
    from runners.idle import hold_runner

    monkeypatch.setenv("QWEN3_4B_EMBED_IDLE_UNLOAD_SECONDS", "60")
    holder = hold_runner(EMBED, TextEmbedder)

    async def main() -> None:
        ask = lambda: holder.shared_forward([[5, 9, 14], [7, 2]], "last", [4, 11])  # noqa: E731
        before = await ask()
        model = weakref.ref(holder.model)
        holder._clock = lambda: float("inf")
        assert await holder.unload_if_idle()
        assert model() is None and holder.describe()["model_state"] == "unloaded"
        holder._clock = lambda: 0.0
        assert await ask() == before
        assert holder.describe()["model_state"] == "loaded" and holder.loads == 1

    try:
        asyncio.run(main())
    finally:
        holder.close()


def test_the_budget_counts_the_shared_4b_once(monkeypatch):
    """Under a GPU budget (embed_ops/profiles.py), a service on another's model reserves nothing: the light
    profile's GPU holds SigLIP2 and one Qwen3-4B."""
    from embed_ops.profiles import budget_figures

    for key in ("EMBED_QUANTIZATION", "EMBED_DEVICE", EMBED.model_env, RERANK.model_env):
        monkeypatch.delenv(key, raising=False)
    names = ["siglip2_embed", "qwen3_4b_embed", "qwen3_4b_rerank"]
    monkeypatch.setenv(RERANK.model_host_env, f"http://127.0.0.1:{EMBED.port}")
    assert [figure.seed_name for figure in budget_figures(names)["0"]] == ["siglip2_embed", "qwen3_4b_embed"]
    monkeypatch.setenv(RERANK.model_host_env, "")  # two copies: both reserve theirs
    assert [figure.seed_name for figure in budget_figures(names)["0"]] == names
