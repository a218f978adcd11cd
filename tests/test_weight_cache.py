"""The int8 weight cache (runners/weight_cache.py): a load after the first reads the quantized weights from disk
and computes exactly what quantizing the checkpoint computes; a stale or corrupt entry is never loaded but rebuilt;
a write that fails costs the cache, never the load. How much faster a cached load is: bench/weight_cache.py."""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock

import runners.loading
import runners.weight_cache
from embed_core.config import RunnerConfig
from embed_core.errors import Overloaded
from embed_core.table import SERVICES
from runners.embedder import TextEmbedder
from runners.idle import IdleUnloading, hold_runner
from runners.int8 import Int8Linear
from runners.reranker import Reranker
from runners.weight_cache import WeightCache

TEXTS = ["an orange cat sleeps in the sun", "一只橙色的猫", "yes"]


class Quantizations:
    """Counts the quantizations of a checkpoint (what a load from the cache must not do)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = runners.loading.quantize_after_loading

        def counted(*args: Any, **kwargs: Any) -> None:
            self.count += 1
            original(*args, **kwargs)

        monkeypatch.setattr(runners.loading, "quantize_after_loading", counted)


@pytest.fixture
def cache_dir(monkeypatch, tmp_path) -> Path:
    directory = tmp_path / "weights"
    monkeypatch.setenv("EMBED_WEIGHT_CACHE", str(directory))
    monkeypatch.setenv("EMBED_DEVICE", "cpu")
    monkeypatch.setenv("EMBED_QUANTIZATION", "int8")
    monkeypatch.setenv("EMBED_COMPILE", "0")
    return directory


def embedder(monkeypatch, seed_name: str, model: Path | str) -> TextEmbedder:
    spec = SERVICES[seed_name]
    monkeypatch.setenv(spec.model_env, str(model))
    return TextEmbedder(spec, RunnerConfig.from_env(spec))


def vectors(runner: TextEmbedder) -> torch.Tensor:
    return torch.tensor(asyncio.run(runner.embed(TEXTS)))


def entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "checkpoint"
    shutil.copytree(model_dir, copy)
    return copy


@pytest.mark.parametrize(
    ("seed_name", "fixture"),
    [("qwen3_8b_embed", "qwen3_embedding_dir"), ("bge_embed", "bge_dir"), ("qwen3_4b_embed", "zimage_root")],
    ids=["qwen3", "bert", "z-image-text-encoder"],
)
def test_a_load_from_the_cache_quantizes_nothing_and_computes_the_same(
    monkeypatch, request, cache_dir, seed_name, fixture
):
    quantizations = Quantizations(monkeypatch)
    model = request.getfixturevalue(fixture)
    first = embedder(monkeypatch, seed_name, model)
    assert quantizations.count == 1 and len(entries(cache_dir)) == 1
    cached = embedder(monkeypatch, seed_name, model)
    assert quantizations.count == 1  # read from the entry, not quantized again
    assert any(isinstance(module, Int8Linear) for module in cached.model.modules())
    assert not any(type(module) is torch.nn.Linear for module in cached.model.modules())
    first_state, cached_state = first.model.state_dict(), cached.model.state_dict()
    assert first_state.keys() == cached_state.keys()
    assert all(torch.equal(first_state[name], cached_state[name]) for name in first_state)
    # The buffers a model computes when built (not in a state dict) are there too: the answers are the same.
    assert torch.equal(vectors(first), vectors(cached))
    first.close()
    cached.close()


def test_the_real_minilm_weights_load_from_the_cache_with_the_same_answers(monkeypatch, cache_dir):
    quantizations = Quantizations(monkeypatch)
    first = embedder(monkeypatch, "bge_embed", "demo")
    cached = embedder(monkeypatch, "bge_embed", "demo")
    assert quantizations.count == 1
    assert torch.equal(vectors(first), vectors(cached))
    first.close()
    cached.close()


def test_a_reranker_loads_from_the_cache_with_the_same_scores(monkeypatch, cache_dir, qwen3_reranker_dir):
    spec = SERVICES["qwen3_8b_rerank"]
    monkeypatch.setenv(spec.model_env, str(qwen3_reranker_dir))
    quantizations = Quantizations(monkeypatch)
    first, cached = Reranker(spec), Reranker(spec)
    assert quantizations.count == 1
    documents = ["the cat sleeps", "dogs run on grass", "stock prices"]
    assert asyncio.run(first.score("where is the cat?", documents)) == asyncio.run(
        cached.score("where is the cat?", documents)
    )
    first.close()
    cached.close()


def test_tied_weights_are_stored_once_and_stay_one_tensor(monkeypatch, cache_dir, tmp_path):
    """Qwen3-4B ties its LM head to its input embeddings: the entry holds that tensor once, and so does the model."""
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    from tests.conftest import qwen3_config

    directory = tmp_path / "tied"
    torch.manual_seed(5)
    Qwen3ForCausalLM(qwen3_config(300)).save_pretrained(str(directory))
    spec = SERVICES["qwen3_8b_embed"]
    monkeypatch.setenv(spec.model_env, str(directory))
    config = RunnerConfig.from_env(spec)
    cache = WeightCache.for_model(directory, config, AutoModelForCausalLM, torch.float32)
    assert cache is not None
    files = runners.loading.locate(config)
    built = runners.loading.load_pretrained(AutoModelForCausalLM, files, config, torch.device("cpu"), torch.float32)
    loaded = cache.load(torch.device("cpu"))
    assert loaded is not None
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.equal(built(ids).logits, loaded(ids).logits)


def test_a_changed_checkpoint_makes_the_entry_stale_and_it_is_rebuilt(
    monkeypatch, cache_dir, bge_dir, tmp_path, caplog
):
    from transformers import AutoModel

    checkpoint = copy_of(bge_dir, tmp_path)
    old = embedder(monkeypatch, "bge_embed", checkpoint)
    # New weights in the same place (the checkpoint updated): other values, another size or modification time.
    model = AutoModel.from_pretrained(str(checkpoint))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    model.save_pretrained(str(checkpoint))
    quantizations = Quantizations(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="runners.weight_cache"):
        new = embedder(monkeypatch, "bge_embed", checkpoint)
    assert quantizations.count == 1 and "stale" in caplog.text
    monkeypatch.setenv("EMBED_WEIGHT_CACHE", "off")
    reference = embedder(monkeypatch, "bge_embed", checkpoint)
    assert torch.equal(vectors(new), vectors(reference)) and not torch.equal(vectors(new), vectors(old))
    monkeypatch.setenv("EMBED_WEIGHT_CACHE", str(cache_dir))
    embedder(monkeypatch, "bge_embed", checkpoint).close()  # the rebuilt entry is a hit now
    assert quantizations.count == 2
    for runner in (old, new, reference):
        runner.close()


def corrupt_one_byte(entry: Path) -> None:
    data = bytearray(entry.read_bytes())
    data[-100] ^= 0xFF  # in the tensors' bytes, after the header
    entry.write_bytes(bytes(data))


def truncate(entry: Path) -> None:
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])


@pytest.mark.parametrize(("damage", "said"), [(corrupt_one_byte, "checksum"), (truncate, "unreadable")])
def test_a_corrupt_entry_is_never_loaded_but_rebuilt(monkeypatch, cache_dir, bge_dir, caplog, damage, said):
    first = embedder(monkeypatch, "bge_embed", bge_dir)
    (entry,) = entries(cache_dir)
    damage(entry)
    quantizations = Quantizations(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="runners.weight_cache"):
        again = embedder(monkeypatch, "bge_embed", bge_dir)
    assert quantizations.count == 1 and said in caplog.text
    assert torch.equal(vectors(first), vectors(again))
    embedder(monkeypatch, "bge_embed", bge_dir).close()  # rebuilt: a hit now
    assert quantizations.count == 1
    first.close()
    again.close()


def test_a_full_disk_costs_the_cache_not_the_load(monkeypatch, cache_dir, bge_dir, caplog):
    from safetensors.torch import save_file

    def fills_the_disk(tensors: dict, path: str, metadata: dict) -> None:
        save_file(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # part of it written, then the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", fills_the_disk)
    with caplog.at_level(logging.WARNING, logger="runners.weight_cache"):
        runner = embedder(monkeypatch, "bge_embed", bge_dir)
    assert "No space left on device" in caplog.text and "not cached" in caplog.text
    assert not entries(cache_dir) and not list(cache_dir.glob("*.tmp"))  # no entry, no part of one
    assert vectors(runner).shape == (3, 48)  # served all the same
    runner.close()


def test_too_little_free_space_is_said_before_writing(monkeypatch, cache_dir, bge_dir, caplog):
    monkeypatch.setattr(runners.weight_cache.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 9, 1))
    with caplog.at_level(logging.WARNING, logger="runners.weight_cache"):
        embedder(monkeypatch, "bge_embed", bge_dir).close()
    assert "not enough free space" in caplog.text and not entries(cache_dir)


def test_an_entry_another_process_is_writing_is_left_to_it(monkeypatch, cache_dir, bge_dir):
    cache_dir.mkdir(parents=True)
    spec = SERVICES["bge_embed"]
    monkeypatch.setenv(spec.model_env, str(bge_dir))
    from transformers import AutoModel

    cache = WeightCache.for_model(bge_dir, RunnerConfig.from_env(spec), AutoModel, torch.float32)
    assert cache is not None
    with FileLock(str(cache.path) + ".lock"):
        embedder(monkeypatch, "bge_embed", bge_dir).close()
        assert not entries(cache_dir)


def test_the_cache_is_off_for_unquantized_models_and_when_turned_off(monkeypatch, cache_dir, bge_dir):
    monkeypatch.setenv("EMBED_QUANTIZATION", "none")
    embedder(monkeypatch, "bge_embed", bge_dir).close()
    monkeypatch.setenv("EMBED_QUANTIZATION", "int8")
    monkeypatch.setenv("BGE_EMBED_WEIGHT_CACHE", "off")
    embedder(monkeypatch, "bge_embed", bge_dir).close()
    assert not cache_dir.exists()


# -- with idle unloading: what a reload meets ---------------------------------------------------------


@pytest.fixture
def idle_int8(monkeypatch, cache_dir, bge_dir, tmp_path):
    spec = SERVICES["bge_embed"]
    model_dir = copy_of(bge_dir, tmp_path)
    monkeypatch.setenv(spec.model_env, str(model_dir))
    monkeypatch.setenv("BGE_EMBED_IDLE_UNLOAD_SECONDS", "60")
    holder = hold_runner(spec, TextEmbedder)
    assert isinstance(holder, IdleUnloading)
    yield holder, model_dir
    holder.close()


async def unload(holder: IdleUnloading) -> None:
    holder._clock = lambda: float("inf")  # idle for ever
    assert await holder.unload_if_idle()
    holder._clock = lambda: 0.0


def test_a_reload_reads_the_cache_and_a_corrupt_one_is_rebuilt_while_the_request_is_answered(
    monkeypatch, idle_int8, cache_dir
):
    holder, _ = idle_int8
    quantizations = Quantizations(monkeypatch)

    async def main() -> None:
        expected = await holder.embed(TEXTS)
        await unload(holder)
        assert await holder.embed(TEXTS) == expected and quantizations.count == 0  # from the cache
        await unload(holder)
        (entry,) = entries(cache_dir)
        corrupt_one_byte(entry)
        assert await holder.embed(TEXTS) == expected and quantizations.count == 1  # not loaded: rebuilt
        await unload(holder)
        assert await holder.embed(TEXTS) == expected and quantizations.count == 1  # the rebuilt entry

    asyncio.run(main())


def test_a_checkpoint_deleted_behind_a_valid_entry_is_a_503_naming_it_then_served_once_back(idle_int8):
    """The entry cannot be checked against a checkpoint that is gone, so it is not served from."""
    holder, model_dir = idle_int8
    moved = model_dir.with_name("moved")

    async def main() -> None:
        expected = await holder.embed(TEXTS)
        await unload(holder)
        model_dir.rename(moved)
        with pytest.raises(Overloaded, match="could not be loaded again") as failed:
            await holder.embed(TEXTS)
        assert str(model_dir) in str(failed.value)
        moved.rename(model_dir)
        assert await holder.embed(TEXTS) == expected

    asyncio.run(main())


# -- served -----------------------------------------------------------------------------------------------


@pytest.fixture
def int8_served(tmp_path_factory):
    """MiniLM (`demo`) at int8, its weight cache in a fresh directory, BGE_EMBED_IDLE_UNLOAD_SECONDS=2."""
    from tests.conftest import serve

    directory = tmp_path_factory.mktemp("serve-int8-cache")
    env = {
        "BGE_EMBED_MODEL": "demo",
        "BGE_EMBED_QUANTIZATION": "int8",
        "BGE_EMBED_IDLE_UNLOAD_SECONDS": "2",
        "EMBED_WEIGHT_CACHE": str(directory / "weights"),
    }
    for served in serve("BgeEmbed", env, directory / "bentoml.log"):
        yield served, directory / "weights"


@pytest.mark.serve
def test_a_served_int8_service_writes_its_entry_and_reloads_from_it_with_the_same_answers(int8_served):
    """The service's own path (service.py, hold_runner, the idle timer): the entry is written at start-up, an idle
    unload and a request read it back (it is not written again), a corrupt one is rebuilt, and every answer is the
    same. States, not times."""
    served, directory = int8_served
    (entry,) = entries(directory)
    first = served.post("/embed/texts", json={"texts": TEXTS})
    assert first.status_code == 200, first.text

    def reload(damage: Callable[[Path], None] | None) -> None:
        reloads = served.get("/health").json()["reloads"]
        served.gate.wait_until(lambda: served.get("/health").json()["model_state"] == "unloaded", "the idle unload")
        if damage is not None:
            damage(entry)
        again = served.post("/embed/texts", json={"texts": TEXTS})
        assert again.status_code == 200, again.text
        assert again.json()["embeddings"] == first.json()["embeddings"]
        assert served.get("/health").json()["reloads"] > reloads

    written = entry.stat()
    reload(None)
    assert (entry.stat().st_ino, entry.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # read, not rebuilt
    reload(corrupt_one_byte)
    assert "fails its checksum; quantizing the checkpoint again" in served.log_path.read_text()
    assert entry.stat().st_ino != written.st_ino and entries(directory) == [entry]  # rebuilt in place, by a rename
