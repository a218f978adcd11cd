"""Start-up: locating weights, settings from the environment, quantization."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from embed_core.config import RunnerConfig
from embed_core.errors import ModelLoadError
from embed_core.table import SERVICES
from runners.embedder import TextEmbedder
from runners.loading import locate


def config_for(seed_name: str, monkeypatch, **env: str) -> RunnerConfig:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return RunnerConfig.from_env(SERVICES[seed_name])


def test_defaults_come_from_the_table(monkeypatch):
    for name in ("QWEN3_8B_EMBED_MODEL", "QWEN3_8B_EMBED_QUANTIZATION", "EMBED_QUANTIZATION"):
        monkeypatch.delenv(name, raising=False)
    config = RunnerConfig.from_env(SERVICES["qwen3_8b_embed"])
    assert (config.model, config.quantization) == ("Qwen/Qwen3-Embedding-8B", "int8")
    assert RunnerConfig.from_env(SERVICES["bge_embed"]).quantization == "none"


def test_a_service_setting_overrides_the_global_one(monkeypatch):
    config = config_for("bge_embed", monkeypatch, EMBED_MAX_BATCH_TOKENS="999", BGE_EMBED_MAX_BATCH_TOKENS="555")
    assert config.max_batch_tokens == 555


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BGE_EMBED_QUANTIZATION": "int3"}, "BGE_EMBED_QUANTIZATION"),
        ({"BGE_EMBED_POOLING": "max"}, "BGE_EMBED_POOLING"),
        ({"EMBED_MAX_BATCH_TOKENS": "lots"}, "EMBED_MAX_BATCH_TOKENS"),
    ],
)
def test_bad_settings_are_refused_with_the_variable_named(monkeypatch, env, message):
    with pytest.raises(ModelLoadError, match=message):
        config_for("bge_embed", monkeypatch, **env)


def test_missing_directory_names_the_variable(monkeypatch, tmp_path):
    config = config_for("bge_embed", monkeypatch, BGE_EMBED_MODEL=str(tmp_path / "absent"))
    with pytest.raises(ModelLoadError, match="BGE_EMBED_MODEL=.*no such directory"):
        locate(config)


def test_a_directory_that_is_not_a_model_is_refused(monkeypatch, tmp_path):
    config = config_for("bge_embed", monkeypatch, BGE_EMBED_MODEL=str(tmp_path))
    with pytest.raises(ModelLoadError, match="BGE_EMBED_MODEL=.*no config.json"):
        locate(config)


def test_corrupt_weights_fail_at_start_up_with_the_variable_named(monkeypatch, bge_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bge_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    config = config_for("bge_embed", monkeypatch, BGE_EMBED_MODEL=str(broken), EMBED_DEVICE="cpu")
    with pytest.raises(ModelLoadError, match="BGE_EMBED_MODEL"):
        TextEmbedder(SERVICES["bge_embed"], config)


def test_a_hub_id_that_cannot_be_downloaded_names_the_variable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = config_for("qwen3_8b_embed", monkeypatch, QWEN3_8B_EMBED_MODEL="nobody/no-such-model")
    with pytest.raises(ModelLoadError, match="QWEN3_8B_EMBED_MODEL='nobody/no-such-model'"):
        locate(config)


def test_a_diffusers_pipeline_root_uses_its_text_encoder_and_tokenizer(monkeypatch, zimage_root):
    files = locate(config_for("qwen3_4b_embed", monkeypatch, QWEN3_4B_EMBED_MODEL=str(zimage_root)))
    assert files.model_dir == zimage_root / "text_encoder"
    assert files.tokenizer_dir == zimage_root / "tokenizer"


def test_cuda_requested_without_a_gpu_is_refused(monkeypatch, bge_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = config_for("bge_embed", monkeypatch, BGE_EMBED_MODEL=str(bge_dir), EMBED_DEVICE="cuda")
    with pytest.raises(ModelLoadError, match="EMBED_DEVICE"):
        TextEmbedder(SERVICES["bge_embed"], config)


def test_bnb_int8_loads_and_answers_on_cpu(monkeypatch, qwen3_embedding_dir):
    """bitsandbytes LLM.int8() (bnb-int8) runs on the CPU, and stays close to full precision."""
    config = config_for(
        "qwen3_8b_embed",
        monkeypatch,
        QWEN3_8B_EMBED_MODEL=str(qwen3_embedding_dir),
        EMBED_DEVICE="cpu",
        QWEN3_8B_EMBED_QUANTIZATION="bnb-int8",
    )
    assert config.quantization == "bnb-int8"
    int8 = TextEmbedder(SERVICES["qwen3_8b_embed"], config)
    assert type(int8.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    assert int8.packed is not None and not int8.packed.functional  # quantized layers run as their own modules
    full = TextEmbedder(
        SERVICES["qwen3_8b_embed"], config_for("qwen3_8b_embed", monkeypatch, QWEN3_8B_EMBED_QUANTIZATION="none")
    )
    texts = ["an orange cat sleeps in the sun", "a black dog"]
    a = torch.tensor(asyncio.run(int8.embed(texts)))
    b = torch.tensor(asyncio.run(full.embed(texts)))
    assert (F.cosine_similarity(a, b) > 0.98).all()
    assert int8.describe()["quantization"] == "bnb-int8"
    int8.close()
    full.close()
