"""Idle unloading (runners/idle.py): the model is dropped after IDLE_UNLOAD_SECONDS without a request and loaded
again for the next one. The idle check is called directly on a clock the test advances; loads and frees are held
on events, so nothing here depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch

from embed_core.errors import InputError, Overloaded
from embed_core.table import SERVICES
from runners.batching import Batcher
from runners.idle import IdleUnloading, hold_runner
from tests.conftest import HANG_GUARD_SECONDS, Served

IDLE = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Weights:
    """Stands for a model's memory: the test holds a weak reference to it and sees it go."""


class FakeRunner:
    KEPT_WHEN_UNLOADED = frozenset({"config", "max_length", "generation"})

    def __init__(self, generation: int, computing: threading.Event, proceed: threading.Event) -> None:
        self.generation, self.config, self.max_length = generation, {"max_items_per_request": 4}, 8
        self.model = Weights()
        self.computing, self.proceed = computing, proceed
        self.batcher: Batcher[str, int] = Batcher(self._process, max_batch_items=64, name="fake")

    def _process(self, items: list[str]) -> list[int]:
        self.computing.set()
        assert self.proceed.wait(HANG_GUARD_SECONDS)
        return [len(item) for item in items]

    async def embed(self, texts: list[str]) -> list[int]:
        return await self.batcher.submit(texts)

    def prompts(self, texts: list[str]) -> list[str]:  # reads no model: answers from the light copy too
        return [f"{self.max_length}:{text}" for text in texts]

    def describe(self) -> dict[str, Any]:
        return {"device": "cpu", "generation": self.generation, "batches": self.batcher.stats.batches}

    def close(self) -> None:
        self.batcher.close()


class Builds:
    """The holder's `build`: counts loads, can hold one until released, and can fail."""

    def __init__(self) -> None:
        self.count = 0
        self.started, self.release = threading.Event(), threading.Event()
        self.release.set()
        self.failure: Exception | None = None
        self.events: list[str] = []
        self.computing, self.proceed = threading.Event(), threading.Event()
        self.proceed.set()

    def __call__(self) -> FakeRunner:
        self.started.set()
        assert self.release.wait(HANG_GUARD_SECONDS)
        if self.failure is not None:
            raise self.failure
        self.count += 1
        self.events.append("built")
        return FakeRunner(self.count, self.computing, self.proceed)


def holder_of(builds: Builds, clock: Clock, load_wait: float = HANG_GUARD_SECONDS) -> IdleUnloading[FakeRunner]:
    holder: IdleUnloading[FakeRunner] = IdleUnloading(
        builds, idle_seconds=IDLE, load_wait_seconds=load_wait, name="fake", clock=clock
    )
    holder.adopt(FakeRunner(0, builds.computing, builds.proceed))
    return holder


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (on the event loop) until condition holds; a hang guard, not a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_GUARD_SECONDS
    while not condition():
        assert loop.time() < deadline, f"still waiting for {what}"
        await asyncio.sleep(0.01)


async def wait_thread_event(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, HANG_GUARD_SECONDS)


def test_unloads_after_idle_seconds_and_loads_again_on_the_next_request():
    builds, clock = Builds(), Clock()

    async def main() -> None:
        holder = holder_of(builds, clock)
        assert await holder.embed(["abc"]) == [3]
        weights = weakref.ref(holder._runner.model)
        clock.now += IDLE - 1
        assert not await holder.unload_if_idle()  # not idle long enough
        clock.now += 1
        assert await holder.unload_if_idle()
        assert holder.state == "unloaded" and weights() is None  # nothing holds the model any more
        described = holder.describe()
        assert described["model_state"] == "unloaded" and described["generation"] == 0  # the last runner's facts
        assert described["batches"] == 1
        # What a service reads without awaiting still answers, from the light copy (no model in it).
        assert holder.max_length == 8 and holder.prompts(["x"]) == ["8:x"]
        assert not hasattr(holder._light, "model")
        assert await holder.embed(["abcd", "e"]) == [4, 1]  # loaded again, and answered
        assert holder.state == "loaded" and builds.count == 1 and holder.loads == 1
        assert holder.describe()["generation"] == 1
        assert holder.describe()["batches"] == 2  # the counters carry over to the new queue
        holder.close()

    asyncio.run(main())


def test_concurrent_requests_share_one_load():
    builds, clock = Builds(), Clock()

    async def main() -> None:
        holder = holder_of(builds, clock)
        clock.now += IDLE
        assert await holder.unload_if_idle()
        builds.release.clear()
        requests = [asyncio.ensure_future(holder.embed(["a" * size])) for size in range(1, 6)]
        await wait_thread_event(builds.started)
        assert holder.state == "loading" and holder.describe()["model_state"] == "loading"
        builds.release.set()
        assert await asyncio.gather(*requests) == [[size] for size in range(1, 6)]
        assert builds.count == 1
        holder.close()

    asyncio.run(main())


def test_the_idle_check_never_unloads_under_a_request():
    builds, clock = Builds(), Clock()

    async def main() -> None:
        holder = holder_of(builds, clock)
        builds.proceed.clear()
        request = asyncio.ensure_future(holder.embed(["abc"]))
        await wait_thread_event(builds.computing)
        clock.now += 10 * IDLE
        assert not await holder.unload_if_idle()  # the request is computing
        builds.proceed.set()
        assert await request == [3]
        assert not await holder.unload_if_idle()  # idle time counts from the request's end
        clock.now += IDLE
        assert await holder.unload_if_idle()
        holder.close()

    asyncio.run(main())


def test_a_request_during_an_unload_is_answered_and_its_load_waits_for_the_memory():
    builds, clock = Builds(), Clock()

    async def main() -> None:
        holder = holder_of(builds, clock)
        freeing, free = threading.Event(), threading.Event()

        def held_free(uses_cuda: bool) -> None:
            freeing.set()
            assert free.wait(HANG_GUARD_SECONDS)
            builds.events.append("freed")

        holder._free = held_free  # type: ignore[method-assign]
        clock.now += IDLE
        unloading = asyncio.ensure_future(holder.unload_if_idle())
        await wait_thread_event(freeing)
        assert holder.describe()["model_state"] == "unloading"
        request = asyncio.ensure_future(holder.embed(["abcde"]))
        await until(lambda: holder.state == "loading", "the request to start a load")
        free.set()
        assert await request == [5]
        assert await unloading
        assert builds.events == ["freed", "built"]  # never two models in memory at once
        holder.close()

    asyncio.run(main())


def test_a_failed_load_is_a_503_naming_its_cause_and_the_next_request_tries_again():
    builds, clock = Builds(), Clock()

    async def main() -> None:
        holder = holder_of(builds, clock)
        clock.now += IDLE
        assert await holder.unload_if_idle()
        builds.failure = FileNotFoundError("model.safetensors is gone")
        with pytest.raises(Overloaded, match="model.safetensors is gone") as failed:
            await holder.embed(["abc"])
        assert failed.value.retry_after is None
        assert holder.state == "unloaded" and "model.safetensors is gone" in holder.describe()["load_error"]
        builds.failure = None
        assert await holder.embed(["abc"]) == [3]
        assert holder.state == "loaded" and "load_error" not in holder.describe()
        holder.close()

    asyncio.run(main())


def test_a_request_that_waits_longer_than_load_wait_seconds_is_told_to_retry():
    builds, clock = Builds(), Clock()

    async def main() -> None:
        holder = holder_of(builds, clock, load_wait=0.01)
        clock.now += IDLE
        assert await holder.unload_if_idle()
        builds.release.clear()  # the load cannot end before the wait does, however fast the machine
        with pytest.raises(Overloaded, match="loading") as waited:
            await holder.embed(["abc"])
        assert waited.value.retry_after is not None and 1 <= waited.value.retry_after <= 60
        assert holder.state == "loading"  # the load goes on without its waiter
        builds.release.set()
        await until(lambda: holder.state == "loaded", "the load to end")
        holder.load_wait_seconds = HANG_GUARD_SECONDS
        assert await holder.embed(["abc"]) == [3] and builds.count == 1
        holder.close()

    asyncio.run(main())


def test_the_timer_unloads_on_its_own():
    """The idle timer itself, on the real clock: a hang guard waits for the unload, nothing is timed."""
    builds = Builds()

    async def main() -> None:
        holder: IdleUnloading[FakeRunner] = IdleUnloading(builds, idle_seconds=0, load_wait_seconds=60, name="fake")
        holder.adopt(FakeRunner(0, builds.computing, builds.proceed))
        holder.start_idle_timer()
        await until(lambda: holder.state == "unloaded", "the timer to unload")
        holder.close()

    asyncio.run(main())


# -- a real runner ------------------------------------------------------------------------------------


@pytest.fixture
def idle_bge(monkeypatch, bge_dir, tmp_path):
    """BGE on a copy of the tiny checkpoint (a test deletes it), held by hold_runner as the service holds it."""
    from runners.embedder import TextEmbedder

    spec = SERVICES["bge_embed"]
    model_dir = tmp_path / "bge"
    shutil.copytree(bge_dir, model_dir)
    monkeypatch.setenv(spec.model_env, str(model_dir))
    monkeypatch.setenv("EMBED_DEVICE", "cpu")
    monkeypatch.setenv("BGE_EMBED_IDLE_UNLOAD_SECONDS", "60")
    holder = hold_runner(spec, TextEmbedder)
    assert isinstance(holder, IdleUnloading)
    yield holder, model_dir
    holder.close()


def test_hold_runner_is_the_runner_itself_when_idle_unloading_is_off(monkeypatch, bge_dir):
    from runners.embedder import TextEmbedder

    spec = SERVICES["bge_embed"]
    monkeypatch.setenv(spec.model_env, str(bge_dir))
    monkeypatch.setenv("EMBED_DEVICE", "cpu")
    runner = hold_runner(spec, TextEmbedder)
    assert type(runner) is TextEmbedder
    runner.close()


def test_a_text_embedder_gives_its_model_back_and_answers_the_same_after_reloading(idle_bge):
    holder, _ = idle_bge
    texts = ["一只橙色的猫", "黑狗在草地上奔跑"]

    async def main() -> None:
        before = await holder.embed(texts)
        model, tokenizer = weakref.ref(holder.model), weakref.ref(holder.tokenizer)
        holder._clock = lambda: float("inf")  # idle for ever
        assert await holder.unload_if_idle()
        assert model() is None and tokenizer() is None
        # What the HTTP layer reads without awaiting (service.py, embed_http/tei.py) answers while unloaded.
        assert holder.prompts(["猫"]) == ["猫"] and holder.max_length == 512 and holder.named_prompts == {}
        assert holder.config.max_items_per_request == 256 and holder.dimension == 48
        assert holder.describe()["model_state"] == "unloaded"
        holder._clock = lambda: 0.0
        assert await holder.embed(texts) == before
        tokens = await holder.tokenize(["猫"])
        assert tokens[0]["tokens"] == ["[CLS]", "猫", "[SEP]"]

    asyncio.run(main())


def test_a_checkpoint_deleted_while_unloaded_is_a_503_naming_it_then_served_once_it_is_back(idle_bge):
    holder, model_dir = idle_bge
    moved = model_dir.with_name("bge-moved")

    async def main() -> None:
        expected = await holder.embed(["猫"])
        holder._clock = lambda: float("inf")
        assert await holder.unload_if_idle()
        model_dir.rename(moved)
        with pytest.raises(Overloaded, match="could not be loaded again") as failed:
            await holder.embed(["猫"])
        assert str(model_dir) in str(failed.value)
        moved.rename(model_dir)
        assert await holder.embed(["猫"]) == expected

    asyncio.run(main())


def test_the_http_layer_answers_a_load_wait_with_each_protocols_status_and_retry_after():
    """503 on the seed's, OpenAI's and Cohere's routes; TEI answers an overloaded model with 429."""
    from embed_http.registry import PROTOCOLS
    from embed_http.seed import SEED, json_errors

    async def loading() -> None:
        raise Overloaded("the model is loading", retry_after=7)

    expected = {"seed": 503, "openai": 503, "cohere": 503, "tei": 429}
    assert {protocol.name for protocol in (SEED, *PROTOCOLS)} == set(expected)
    for name, wrap in [("seed", json_errors), *((protocol.name, protocol.guarded) for protocol in PROTOCOLS)]:
        response = asyncio.run(wrap(loading)())
        assert response.status_code == expected[name] and response.headers["retry-after"] == "7", name
        assert "loading" in json.dumps(json.loads(response.body))


# -- served ---------------------------------------------------------------------------------------------


def tree_rss(pid: int) -> int:
    """Resident memory of the server's process tree (BentoML's main process and its worker)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


IDLE_TEXTS = ["an orange cat sleeps in the sun", "一只橙色的猫在阳光下晒太阳"]


@pytest.fixture
def idle_served(tmp_path_factory):
    """MiniLM (`demo`) served with BGE_EMBED_IDLE_UNLOAD_SECONDS=2."""
    from tests.conftest import serve

    log_path = tmp_path_factory.mktemp("serve-idle") / "bentoml.log"
    yield from serve("BgeEmbed", {"BGE_EMBED_MODEL": "demo", "BGE_EMBED_IDLE_UNLOAD_SECONDS": "2"}, log_path)


def health(served: Served) -> dict[str, Any]:
    return served.get("/health").json()


def embed_and_read_rss(served: Served) -> tuple[list[list[float]], int, dict[str, Any]]:
    """Embed IDLE_TEXTS, then read the server's RSS with the model loaded and warm (its weights read by that pass):
    a reading counts when /health says loaded before and after it with the same number of reloads (so the idle
    timer did not unload the model in between); otherwise the next try. Not a timing: a consistent reading."""
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    while True:
        response = served.post("/embed/texts", json={"texts": IDLE_TEXTS})
        assert response.status_code == 200, response.text
        first = health(served)
        rss = tree_rss(served.process.pid)
        second = health(served)
        if first["model_state"] == second["model_state"] == "loaded" and first["reloads"] == second["reloads"]:
            return response.json()["embeddings"], rss, second
        assert time.monotonic() < deadline, "no reading with the model loaded"


@pytest.mark.serve
def test_a_served_model_unloads_when_idle_gives_memory_back_and_answers_the_same_after(idle_served):
    """/health goes loaded -> unloaded -> (a request) -> loaded; the vectors are the same; the memory read after
    the unload is lower than with the model loaded. The test waits for states, never for an amount of time."""
    served = idle_served
    before, loaded_rss, state = embed_and_read_rss(served)
    served.gate.wait_until(lambda: health(served)["model_state"] == "unloaded", "the idle model to unload")
    unloaded_rss = tree_rss(served.process.pid)
    unloaded = health(served)
    assert unloaded["model_state"] == "unloaded"  # still: nothing was loaded while the RSS was read
    after, reloaded_rss, state = embed_and_read_rss(served)
    assert state["reloads"] > unloaded["reloads"]  # loaded again by the request
    assert torch.allclose(torch.tensor(after), torch.tensor(before), atol=1e-6)
    # Measured after the fact: the direction, not an amount or a time.
    assert unloaded_rss < loaded_rss and unloaded_rss < reloaded_rss, (loaded_rss, unloaded_rss, reloaded_rss)
    mib = [round(value / 2**20) for value in (loaded_rss, unloaded_rss, reloaded_rss)]
    print(f"server RSS MiB: loaded {mib[0]}, unloaded {mib[1]}, loaded again {mib[2]}")


def test_the_settings_are_read_per_service_and_a_malformed_one_is_refused(monkeypatch):
    from embed_core.config import RunnerConfig
    from embed_core.errors import ModelLoadError

    bge, siglip = SERVICES["bge_embed"], SERVICES["siglip2_embed"]
    assert RunnerConfig.from_env(bge).idle_unload_seconds == 0  # off by default
    monkeypatch.setenv("EMBED_IDLE_UNLOAD_SECONDS", "600")
    monkeypatch.setenv("BGE_EMBED_IDLE_UNLOAD_SECONDS", "30")
    assert RunnerConfig.from_env(bge).idle_unload_seconds == 30
    assert RunnerConfig.from_env(siglip).idle_unload_seconds == 600
    for name, value in (("BGE_EMBED_IDLE_UNLOAD_SECONDS", "soon"), ("BGE_EMBED_LOAD_WAIT_SECONDS", "0")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ModelLoadError, match=name):
            RunnerConfig.from_env(bge)
        monkeypatch.delenv(name)


def test_a_reranker_and_the_image_model_unload_and_answer_the_same_after(monkeypatch, qwen3_reranker_dir, siglip_dir):
    """The other two runner kinds: their model goes, the facts the HTTP layer reads without awaiting stay."""
    from runners.reranker import Reranker
    from runners.siglip import SiglipEmbedder

    monkeypatch.setenv("EMBED_DEVICE", "cpu")
    monkeypatch.setenv("EMBED_QUANTIZATION", "none")
    monkeypatch.setenv("EMBED_IDLE_UNLOAD_SECONDS", "60")
    monkeypatch.setenv(SERVICES["qwen3_8b_rerank"].model_env, str(qwen3_reranker_dir))
    monkeypatch.setenv(SERVICES["siglip2_embed"].model_env, str(siglip_dir))
    reranker = hold_runner(SERVICES["qwen3_8b_rerank"], Reranker)
    siglip = hold_runner(SERVICES["siglip2_embed"], SiglipEmbedder)

    async def cycle(holder: Any, ask: Callable[[], Any], while_unloaded: Callable[[], None]) -> tuple[Any, Any]:
        before = await ask()
        model = weakref.ref(holder.model)
        holder._clock = lambda: float("inf")
        assert await holder.unload_if_idle()
        assert model() is None and holder.describe()["model_state"] == "unloaded"
        while_unloaded()
        holder._clock = lambda: 0.0
        return before, await ask()

    def reranker_facts() -> None:  # what service.py and embed_http/protocols.py read without awaiting
        assert reranker.config.max_items_per_request == 256

    scale, bias = siglip.scale, siglip.bias

    def siglip_facts() -> None:
        assert (siglip.scale, siglip.bias) == (scale, bias) and siglip.settings.max_images_per_request > 0
        with pytest.raises(InputError):
            siglip.check_image_count(0, "images")

    async def main() -> None:
        before, after = await cycle(reranker, lambda: reranker.score("cat", ["an orange cat", "a dog"]), reranker_facts)
        assert after == before
        before, after = await cycle(siglip, lambda: siglip.embed_texts(["an orange cat"]), siglip_facts)
        assert after == before

    try:
        asyncio.run(main())
    finally:
        reranker.close()
        siglip.close()
