"""Faults: running out of device memory, callers that go away, and model directories that are missing
or broken. Out-of-memory is simulated on the CPU by a forward pass that raises torch.OutOfMemoryError.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from embed_core.config import RunnerConfig
from embed_core.errors import ModelLoadError, Overloaded
from embed_core.table import SERVICES
from runners.batching import Batcher
from runners.embedder import TextEmbedder
from tests.conftest import HANG_GUARD_SECONDS, REPO, free_port

TEXTS = [
    "一只橙色的猫",
    "an orange cat sleeps in the sun",
    "黑狗在草地上奔跑",
    "yes",
    "可爱的猫咪在睡觉 " * 20,
    "no",
    "猫",
    "狗",
]


@pytest.fixture
def bge(monkeypatch, bge_dir):
    spec = SERVICES["bge_embed"]
    monkeypatch.setenv(spec.model_env, str(bge_dir))
    monkeypatch.setenv("EMBED_DEVICE", "cpu")
    embedder = TextEmbedder(spec, RunnerConfig.from_env(spec))
    yield embedder
    embedder.close()


def embed_all(embedder: TextEmbedder, requests: list[list[str]]) -> list:
    """Send the requests concurrently (so they share batches); each result is its vectors or its exception."""

    async def run():
        return await asyncio.gather(*(embedder.embed(texts) for texts in requests), return_exceptions=True)

    return asyncio.run(run())


def oom_when(embedder: TextEmbedder, monkeypatch, too_big) -> list[int]:
    """Make the forward pass raise torch.OutOfMemoryError when too_big(batch); return the batch sizes seen."""
    name = "_forward"  # packed or padded, the one forward pass of this model
    real_forward = getattr(embedder, name)
    sizes: list[int] = []

    def forward(batch: list[list[int]]) -> torch.Tensor:
        sizes.append(len(batch))
        if too_big(batch):
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real_forward(batch)

    monkeypatch.setattr(embedder, name, forward)
    return sizes


# -- out of memory -----------------------------------------------------------------------------------


def test_out_of_memory_splits_the_batch_and_retries(bge, monkeypatch):
    expected = embed_all(bge, [[text] for text in TEXTS])
    sizes = oom_when(bge, monkeypatch, lambda batch: len(batch) > 2)
    results = embed_all(bge, [[text] for text in TEXTS])  # concurrent: merged into one batch of 8
    for got, want in zip(results, expected, strict=True):
        assert not isinstance(got, BaseException), got
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-6)
    assert max(sizes) > 2  # the big batch was tried
    assert sum(size for size in sizes if size <= 2) == len(TEXTS)  # then every text ran in a batch that fit
    # The worker is still serving.
    assert torch.allclose(torch.tensor(embed_all(bge, [TEXTS[:2]])[0]), torch.tensor(expected[0] + expected[1]))


def test_a_text_that_does_not_fit_alone_fails_only_its_own_request(bge, monkeypatch):
    long_text = "可爱的猫咪在睡觉 " * 40
    expected = embed_all(bge, [[text] for text in TEXTS])
    too_long = len(bge._tokenize([long_text])[0])
    oom_when(bge, monkeypatch, lambda batch: max(len(ids) for ids in batch) >= too_long)
    results = embed_all(bge, [[long_text], *([text] for text in TEXTS), [TEXTS[0], long_text]])
    assert isinstance(results[0], Overloaded) and isinstance(results[-1], Overloaded)
    for got, want in zip(results[1:-1], expected, strict=True):
        assert not isinstance(got, BaseException), got
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-6)
    assert torch.allclose(torch.tensor(embed_all(bge, [TEXTS[:1]])[0]), torch.tensor(expected[0]))


def test_the_service_answers_out_of_memory_alone_with_a_503(bge_dir, monkeypatch):
    import service

    monkeypatch.setenv("BGE_EMBED_MODEL", str(bge_dir))
    monkeypatch.setenv("EMBED_DEVICE", "cpu")
    instance = service.BgeEmbed.inner()
    try:
        oom_when(instance.engine, monkeypatch, lambda batch: True)
        response = asyncio.run(instance.embed_text(text="一只橙色的猫"))
        assert response.status_code == 503
        assert "memory" in json.loads(response.body)["error"]
        monkeypatch.undo()
        assert len(asyncio.run(instance.embed_text(text="一只橙色的猫")).embedding) == instance.engine.dimension
    finally:
        instance.engine.close()
        gc.unfreeze()  # start-up froze this test process's objects (service.finish_start_up)


# -- callers that go away ------------------------------------------------------------------------------


def test_cancelled_callers_do_not_wedge_the_batcher():
    computing, release = threading.Event(), threading.Event()
    processed: list[list[int]] = []

    def process(items: list[int]) -> list[int]:
        computing.set()
        assert release.wait(HANG_GUARD_SECONDS)  # hold the model while requests queue up behind it
        processed.append(list(items))
        return [item * 10 for item in items]

    async def scenario() -> None:
        batcher: Batcher[int, int] = Batcher(process, max_batch_items=64, name="test")
        running = asyncio.create_task(batcher.submit([1]))
        assert await asyncio.get_running_loop().run_in_executor(None, computing.wait, HANG_GUARD_SECONDS)
        queued = asyncio.create_task(batcher.submit([2]))
        waiting = asyncio.create_task(batcher.submit([3]))
        with pytest.raises(TimeoutError):  # a client that times out while queued (the model is held)
            await asyncio.wait_for(batcher.submit([4]), 0.01)
        await asyncio.sleep(0)  # [2] and [3] are queued
        running.cancel()  # a client that leaves while its batch computes
        queued.cancel()  # a client that leaves while queued
        release.set()
        assert await asyncio.wait_for(waiting, HANG_GUARD_SECONDS) == [30]
        assert await asyncio.wait_for(batcher.submit([5, 6]), HANG_GUARD_SECONDS) == [50, 60]
        assert running.cancelled() and queued.cancelled()
        assert [2] not in processed and not any(4 in batch for batch in processed)  # work nobody waits for is skipped
        batcher.close()

    asyncio.run(scenario())


def test_a_failing_batch_answers_each_request_and_the_batcher_goes_on():
    def process(items: list[str]) -> list[str]:
        if "bad" in items:
            raise ValueError("broken input")
        return [item.upper() for item in items]

    async def scenario() -> None:
        batcher: Batcher[str, str] = Batcher(process, max_batch_items=64, name="test")
        results = await asyncio.gather(
            batcher.submit(["a"]), batcher.submit(["bad"]), batcher.submit(["b", "c"]), return_exceptions=True
        )
        assert results[0] == ["A"] and isinstance(results[1], ValueError) and results[2] == ["B", "C"]
        assert await batcher.submit(["d"]) == ["D"]
        batcher.close()

    asyncio.run(scenario())


# -- model directories that are missing or broken -----------------------------------------------------


def truncate_weights(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def break_header(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])


def remove_weights(directory: Path) -> None:
    (directory / "model.safetensors").unlink()


def bad_json_config(directory: Path) -> None:
    (directory / "config.json").write_text('{"model_type": "bert", "hidden_size": 48,')


def unknown_architecture(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))


def remove_config(directory: Path) -> None:
    (directory / "config.json").unlink()


def remove_vocabulary(directory: Path) -> None:
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)


BREAKAGES = [
    truncate_weights,
    break_header,
    remove_weights,
    bad_json_config,
    unknown_architecture,
    remove_config,
    remove_vocabulary,
]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda function: function.__name__)
def test_a_broken_model_directory_fails_at_construction_naming_the_variable(breakage, bge_dir, tmp_path, monkeypatch):
    broken = tmp_path / "bge"
    shutil.copytree(bge_dir, broken)
    breakage(broken)
    spec = SERVICES["bge_embed"]
    monkeypatch.setenv(spec.model_env, str(broken))
    monkeypatch.setenv("EMBED_DEVICE", "cpu")
    with pytest.raises(ModelLoadError, match=spec.model_env):
        TextEmbedder(spec, RunnerConfig.from_env(spec))


@pytest.mark.parametrize("seed_name", [name for name, spec in SERVICES.items() if spec.kind == "text_embedding"])
def test_a_missing_model_directory_fails_naming_the_variable(seed_name, tmp_path, monkeypatch):
    spec = SERVICES[seed_name]
    monkeypatch.setenv(spec.model_env, str(tmp_path / "not-there"))
    with pytest.raises(ModelLoadError, match=spec.model_env):
        TextEmbedder(spec, RunnerConfig.from_env(spec))


@pytest.mark.serve
def test_bentoml_serve_exits_at_once_on_a_truncated_model(bge_dir, tmp_path):
    """Not respawning a failing worker forever: the check runs in bentoml serve's main process."""
    broken = tmp_path / "bge"
    shutil.copytree(bge_dir, broken)
    truncate_weights(broken)
    env = {**os.environ, "BGE_EMBED_MODEL": str(broken), "EMBED_DEVICE": "cpu", "BENTOML_DO_NOT_TRACK": "true"}
    command = [sys.executable, "-m", "bentoml", "serve", "service:BgeEmbed", "--port", str(free_port())]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "BGE_EMBED_MODEL" in log and "model.safetensors is truncated" in log, log[-3000:]
