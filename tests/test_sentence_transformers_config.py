"""The model's own sentence-transformers config: what the runner reproduces it serves, what it cannot it refuses
at start-up (naming the module), and its default prompt is used. Each model directory here is written by
sentence-transformers itself, and the vectors are compared with its own `encode`."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from embed_core.config import RunnerConfig
from embed_core.errors import ModelLoadError
from embed_core.table import SERVICES
from runners.embedder import TextEmbedder
from tests.references import close

BGE = SERVICES["bge_embed"]
TEXTS = ["一只橙色的猫", "黑狗在草地上跑", "cat"]
QUERY_PROMPT = "为这个句子生成表示以用于检索相关文章："  # BGE-large-zh-v1.5's query instruction


def save_sentence_transformer(bge_dir: Path, directory: Path, *extra_modules, pooling="cls", **options) -> Path:
    """A sentence-transformers model over the tiny BERT: Transformer, Pooling, the extra modules, Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    transformer = Transformer(str(bge_dir))
    width = transformer.get_embedding_dimension()
    modules = [transformer, Pooling(width, pooling), *(make(width) for make in extra_modules), Normalize()]
    SentenceTransformer(modules=modules, device="cpu", **options).save(str(directory))
    return directory


def embedder_for(model: Path, monkeypatch, spec=BGE) -> TextEmbedder:
    monkeypatch.setenv(spec.model_env, str(model))
    monkeypatch.setenv("EMBED_DEVICE", "cpu")
    return TextEmbedder(spec, RunnerConfig.from_env(spec))


def refused(model: Path, monkeypatch, spec=BGE) -> str:
    """The start-up error, from the runner and from the service's check in `bentoml serve`'s main process."""
    import service

    with pytest.raises(ModelLoadError) as runner_error:
        embedder_for(model, monkeypatch, spec)
    with pytest.raises(ModelLoadError) as check_error:
        service.check_start_up(spec)
    assert str(check_error.value) == str(runner_error.value)
    return str(runner_error.value)


def test_a_dense_module_is_refused_naming_it(bge_dir, tmp_path, monkeypatch):
    from sentence_transformers.sentence_transformer.modules import Dense

    model = save_sentence_transformer(bge_dir, tmp_path / "dense", lambda width: Dense(width, 16))
    message = refused(model, monkeypatch)
    assert "Dense" in message and "modules.json" in message


def test_several_pooling_modes_at_once_are_refused(bge_dir, tmp_path, monkeypatch):
    model = save_sentence_transformer(bge_dir, tmp_path / "two-poolings", pooling=("cls", "mean"))
    message = refused(model, monkeypatch)
    assert "cls" in message and "mean" in message and "several pooling modes" in message


def test_the_legacy_pooling_keys_are_read_too(bge_dir, tmp_path, monkeypatch):
    """Pooling configs before sentence-transformers 6 set `pooling_mode_<name>: true` keys."""
    model = save_sentence_transformer(bge_dir, tmp_path / "legacy", pooling="mean")
    config = model / "1_Pooling" / "config.json"
    legacy = {"word_embedding_dimension": 48, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    config.write_text(json.dumps(legacy))
    embedder = embedder_for(model, monkeypatch)
    assert embedder.pooling.name == "mean"
    embedder.close()
    config.write_text(json.dumps({**legacy, "pooling_mode_max_tokens": True}))
    assert "several pooling modes" in refused(model, monkeypatch)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_the_models_default_prompt_is_used_as_sentence_transformers_does(bge_dir, tmp_path, monkeypatch, pooling):
    from sentence_transformers import SentenceTransformer

    model = save_sentence_transformer(
        bge_dir,
        tmp_path / f"prompted-{pooling}",
        pooling=pooling,
        prompts={"query": QUERY_PROMPT, "document": ""},
        default_prompt_name="query",
    )
    embedder = embedder_for(model, monkeypatch)
    try:
        reference = SentenceTransformer(str(model), device="cpu")
        ours = torch.tensor(asyncio.run(embedder.embed(TEXTS)))
        assert embedder.pooling.name == pooling
        assert close(ours, torch.tensor(reference.encode(TEXTS)), atol=1e-5)  # the default prompt, as ST applies it
        documents = torch.tensor(asyncio.run(embedder.embed(TEXTS, instruction="文档：")))
        assert close(documents, torch.tensor(reference.encode(TEXTS, prompt="文档：")), atol=1e-5)
        assert not close(ours, torch.tensor(reference.encode(TEXTS, prompt="")), atol=1e-3)  # the prompt matters
    finally:
        embedder.close()


def test_prompts_the_tables_rule_cannot_write_are_refused(qwen3_embedding_dir, tmp_path, monkeypatch):
    """Qwen3-Embedding's rule writes `Instruct: <instruction>\\nQuery:`; its real prompts fit, an E5-style one not."""
    spec = SERVICES["qwen3_8b_embed"]
    model = Path(shutil.copytree(qwen3_embedding_dir, tmp_path / "qwen3"))
    own = model / "config_sentence_transformers.json"
    card = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
    own.write_text(json.dumps({"prompts": {"query": card, "document": ""}, "default_prompt_name": None}))
    monkeypatch.setenv(f"{spec.env_prefix}_QUANTIZATION", "none")
    embedder = embedder_for(model, monkeypatch, spec)
    assert embedder.default_instruction is None
    embedder.close()
    own.write_text(json.dumps({"prompts": {"query": card}, "default_prompt_name": "query"}))
    embedder = embedder_for(model, monkeypatch, spec)
    assert embedder.default_instruction == "Given a web search query, retrieve relevant passages that answer the query"
    embedder.close()
    own.write_text(json.dumps({"prompts": {"query": "query: "}, "default_prompt_name": None}))
    message = refused(model, monkeypatch, spec)
    assert "'query: '" in message and "instruct_query" in message
