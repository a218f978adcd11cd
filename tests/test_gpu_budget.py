"""The GPU memory budget (runners/gpu_budget.py): the ledger's decisions (fit, least recently used idle service
asked to unload, serving and pinned services never asked, impossible combinations refused with the figures), its
crash safety with real processes killed with SIGKILL, and two idle-unloading holders sharing one budget.

Processes are faked by pid where the ledger's liveness check is injected; the crash tests use real ones. Nothing
here waits on time: clocks are injected, and waits are hang guards."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from embed_core.errors import Overloaded
from embed_core.memory import (
    CONTEXT_GB,
    GIB,
    Figure,
    describe_figures,
    fits_with_idle_unloaded,
    parse_budget,
    service_figure,
)
from embed_core.table import SERVICES
from runners.gpu_budget import EVICTION_FRESH_SECONDS, BudgetFull, Ledger, NeverFits, ServiceBudget
from runners.idle import IdleUnloading
from tests.conftest import HANG_GUARD_SECONDS, REPO
from tests.test_idle_unload import Builds, Clock, FakeRunner, wait_thread_event

GB = 10**9


def test_budgets_are_sizes_or_fractions_of_the_card():
    assert parse_budget("24GiB", None) == 24 * GIB
    assert parse_budget("22GB", None) == parse_budget("22 G", None) == 22 * GB
    assert parse_budget("24000MiB", None) == 24000 * 2**20
    assert parse_budget("0.9", 24 * GIB) == int(0.9 * 24 * GIB) == parse_budget("90%", 24 * GIB)
    for wrong, card in (("lots", 24 * GIB), ("1.5", 24 * GIB), ("0", 24 * GIB), ("0.9", None)):
        with pytest.raises(ValueError, match="EMBED_GPU_MEMORY"):
            parse_budget(wrong, card)


def figures_of(quantizations: dict[str, str]) -> list[Figure]:
    return [service_figure(name, mode, SERVICES[name].params_billion) for name, mode in quantizations.items()]


ALL_SIX = {name: spec.default_quantization for name, spec in SERVICES.items()}


def test_all_six_fit_a_24_gb_card_only_with_idle_unloading():
    figures = figures_of(ALL_SIX)
    assert sum(figure.bytes for figure in figures) > 24 * GIB  # all loaded at once do not fit
    assert fits_with_idle_unloaded(figures, pinned=set(), budget=24 * GIB)
    assert not fits_with_idle_unloaded(figures, pinned=set(ALL_SIX), budget=24 * GIB)
    message = describe_figures(figures, set(ALL_SIX), 24 * GIB, "GPU 0")
    for figure in figures:  # every service with its figure and where the figure comes from
        assert (
            f"{figure.seed_name} {figure.gigabytes:.1f} GB ({figure.quantization}, always loaded; estimate)" in message
        )
    assert "IDLE_UNLOAD_SECONDS" in message


class Processes:
    """Fake processes for the ledger: a pid is alive while it is in the set."""

    def __init__(self) -> None:
        self.live: set[int] = set()

    def alive(self, pid: int, started: float) -> bool:
        return pid in self.live

    def ledger(self, path: Path, pid: int, clock: Clock, budget: int = 20 * GB) -> Ledger:
        self.live.add(pid)
        return Ledger(path, budget, pid=pid, alive=self.alive, clock=clock)


def loaded(ledger: Ledger, name: str, size: int, *, last_used: float, pinned: bool = False) -> None:
    assert ledger.try_reserve(name, size, pinned) is None
    ledger.mark_loaded()
    assert not ledger.publish(serving=False, last_used=last_used)


def test_a_load_that_does_not_fit_asks_the_least_recently_used_idle_service(tmp_path):
    processes, clock = Processes(), Clock()
    path = tmp_path / "gpu0.json"
    a, b, c = (processes.ledger(path, pid, clock) for pid in (101, 102, 103))
    loaded(a, "a", 9 * GB, last_used=50.0)
    loaded(b, "b", 9 * GB, last_used=10.0)  # used least recently
    reason = c.try_reserve("c", 9 * GB, pinned=False)
    assert reason is not None and "asked b to unload" in reason and "2.0 GB of the 20.0 GB budget is free" in reason
    assert b.publish(serving=False, last_used=10.0) and not a.publish(serving=False, last_used=50.0)
    b.release()  # b unloaded
    assert c.try_reserve("c", 9 * GB, pinned=False) is None
    assert {entry.name for entry in c.entries().values()} == {"a", "c"}


def test_a_service_serving_a_request_or_pinned_is_never_asked(tmp_path):
    processes, clock = Processes(), Clock()
    path = tmp_path / "gpu0.json"
    a, b, c = (processes.ledger(path, pid, clock) for pid in (101, 102, 103))
    loaded(a, "a", 9 * GB, last_used=10.0, pinned=True)
    loaded(b, "b", 9 * GB, last_used=20.0)
    b.publish(serving=True, last_used=20.0)
    reason = c.try_reserve("c", 9 * GB, pinned=False)
    assert reason is not None and "waiting for a service to finish its request" in reason
    assert not b.publish(serving=True, last_used=20.0)
    with pytest.raises(BudgetFull, match="after waiting 0 s: c needs 9.0 GB"):  # a wait that ends says why
        c.reserve("c", 9 * GB, pinned=False, wait_seconds=0)
    b.publish(serving=False, last_used=30.0)  # its request ended
    assert "asked b to unload" in (c.try_reserve("c", 9 * GB, pinned=False) or "")
    assert b.publish(serving=False, last_used=30.0)


def test_a_combination_that_cannot_fit_even_with_every_idle_model_unloaded_is_refused_with_the_figures(tmp_path):
    processes, clock = Processes(), Clock()
    path = tmp_path / "gpu0.json"
    a, b, c = (processes.ledger(path, pid, clock) for pid in (101, 102, 103))
    loaded(a, "siglip", 3 * GB, last_used=1.0, pinned=True)
    loaded(b, "qwen3_4b", 9 * GB, last_used=1.0, pinned=True)
    with pytest.raises(NeverFits, match=r"qwen3_8b needs 9.0 GB .* hold 12.0 GB \(siglip 3.0 GB, qwen3_4b 9.0 GB\)"):
        c.try_reserve("qwen3_8b", 9 * GB, pinned=False)


def test_an_eviction_request_goes_stale_once_the_waiting_service_stops_renewing_it(tmp_path):
    processes, clock = Processes(), Clock()
    path = tmp_path / "gpu0.json"
    a, c = processes.ledger(path, 101, clock), processes.ledger(path, 103, clock)
    loaded(a, "a", 15 * GB, last_used=1.0)
    assert c.try_reserve("c", 9 * GB, pinned=False) is not None
    assert a.publish(serving=False, last_used=1.0)
    clock.now += EVICTION_FRESH_SECONDS  # c gave up, or got its memory
    assert not a.publish(serving=False, last_used=1.0)


def test_the_entries_of_dead_processes_are_dropped(tmp_path):
    processes, clock = Processes(), Clock()
    path = tmp_path / "gpu0.json"
    a, b = processes.ledger(path, 101, clock), processes.ledger(path, 102, clock)
    assert a.try_reserve("a", 15 * GB, pinned=True) is None  # loading, then killed
    processes.live.discard(101)
    assert b.try_reserve("b", 15 * GB, pinned=True) is None
    assert [entry.name for entry in b.entries().values()] == ["b"]


# -- real processes, SIGKILL ------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from runners.gpu_budget import Ledger
    path, what = Path(sys.argv[1]), sys.argv[2]
    ledger = Ledger(path, 20 * 10**9)
    if what == "lock":  # killed while holding the ledger's lock, in the middle of a change
        with ledger._entries() as entries:
            print("holding", flush=True)
            time.sleep(3600)
    ledger.try_reserve("killed", 15 * 10**9, pinned=False)
    if what == "loaded":
        ledger.mark_loaded()
    print("holding", flush=True)
    time.sleep(3600)
    """
)


@pytest.mark.parametrize("what", ["loading", "loaded", "lock"])
def test_a_service_killed_while_it_loads_unloads_or_holds_the_lock_leaves_the_budget_correct(tmp_path, what):
    path = tmp_path / "gpu0.json"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), what], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "holding"
        survivor = Ledger(path, 20 * GB)
        if what != "lock":
            assert survivor.try_reserve("survivor", 15 * GB, pinned=False) is not None  # it holds 15 GB
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(HANG_GUARD_SECONDS)
    assert survivor.try_reserve("survivor", 15 * GB, pinned=False) is None
    assert [entry.name for entry in survivor.entries().values()] == ["survivor"]


# -- two holders, one budget --------------------------------------------------------------------------------


def budgeted(builds: Builds, clock: Clock, ledger: Ledger, name: str) -> IdleUnloading[FakeRunner]:
    """An idle-unloading holder of 9 GB in `ledger`'s budget, unloaded."""
    budget = ServiceBudget(ledger, Figure(name, "none", 9.0, "estimate"), pinned=False)
    return IdleUnloading(
        builds, idle_seconds=3600, load_wait_seconds=HANG_GUARD_SECONDS, name=name, clock=clock, budget=budget
    )


async def embed(holder: IdleUnloading[FakeRunner], texts: list[str]) -> list[int]:
    """A request through a holder that has not loaded yet (it has no light copy for its attributes)."""
    async with holder.use() as runner:
        return await runner.embed(texts)


def holder_with_budget(builds: Builds, clock: Clock, ledger: Ledger, name: str) -> IdleUnloading[FakeRunner]:
    """The same, loaded (as hold_runner leaves it)."""
    holder = budgeted(builds, clock, ledger, name)
    assert holder._budget is not None
    holder._budget.reserve(0)
    holder._budget.loaded()
    holder.adopt(FakeRunner(0, builds.computing, builds.proceed))
    return holder


def test_a_load_into_a_full_budget_unloads_the_idle_service_but_never_one_serving(tmp_path):
    processes, clock = Processes(), Clock()
    path = tmp_path / "gpu0.json"
    builds_a, builds_b = Builds(), Builds()

    async def main() -> None:
        a = holder_with_budget(builds_a, clock, processes.ledger(path, 101, clock, budget=10 * GB), "a")
        b_ledger = processes.ledger(path, 102, clock, budget=10 * GB)
        b = budgeted(builds_b, clock, b_ledger, "b")
        builds_a.proceed.clear()
        serving = asyncio.ensure_future(a.embed(["abc"]))  # a is serving a request
        await wait_thread_event(builds_a.computing)
        waiting = asyncio.ensure_future(embed(b, ["abcd"]))  # b must load: the budget has no room
        await until_asked(a)
        assert not await a.answer_budget() and a.state == "loaded"  # asked by nobody while serving
        builds_a.proceed.set()
        assert await serving == [3]
        await until_asked(a)
        assert await a.answer_budget()  # idle now: unloads, and gives its share back
        assert a.state == "unloaded"
        assert await waiting == [4] and builds_b.count == 1
        assert b.describe()["gpu_budget_gb"] == 9.0 and a.describe()["model_state"] == "unloaded"  # /health
        held = {entry.name: (entry.state, entry.bytes) for entry in b_ledger.entries().values()}
        assert held == {"a": ("unloaded", CONTEXT_GB * GB), "b": ("loaded", 9 * GB)}  # a keeps its CUDA context
        # a's next request finds b idle, and b goes in its turn
        again = asyncio.ensure_future(a.embed(["ab"]))
        await until_asked(b)
        assert await b.answer_budget() and await again == [2]
        a.close()
        b.close()

    asyncio.run(main())


async def until_asked(holder: IdleUnloading) -> None:
    """Until a waiting load has asked this holder to unload (its entry flagged); a hang guard, not a deadline."""
    budget = holder._budget
    assert budget is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_GUARD_SECONDS
    while not ((entry := budget.ledger.entries().get(str(budget.ledger.pid))) and entry.evict_at):
        assert loop.time() < deadline, "no load asked for memory"
        await asyncio.sleep(0.01)


def test_a_load_that_can_never_fit_is_a_503_naming_the_budget_and_the_next_request_tries_again(tmp_path):
    processes, clock = Processes(), Clock()
    path = tmp_path / "gpu0.json"
    a = processes.ledger(path, 101, clock, budget=10 * GB)
    loaded(a, "a", 9 * GB, last_used=1.0, pinned=True)
    builds = Builds()
    b_ledger = processes.ledger(path, 102, clock, budget=10 * GB)
    holder = budgeted(builds, clock, b_ledger, "b")

    async def main() -> None:
        with pytest.raises(Overloaded, match=r"could not be loaded again \(NeverFits: b needs 9.0 GB"):
            await embed(holder, ["abc"])
        assert builds.count == 0
        a.release()  # the pinned service stopped: the next request loads
        assert await embed(holder, ["abc"]) == [3]
        holder.close()

    asyncio.run(main())


# -- the launcher: start_embed_server.sh --gpu-memory -------------------------------------------------------

CLEAN = {
    "EMBED_GPU_MEMORY": "",
    "EMBED_GPU_BUDGET_DIR": "",
    "EMBED_QUANTIZATION": "",
    "EMBED_IDLE_UNLOAD_SECONDS": "",
    "EMBED_DEVICE": "",
    **{f"{spec.env_prefix}_{key}": "" for spec in SERVICES.values() for key in ("IDLE_UNLOAD_SECONDS", "DEVICE")},
    **{spec.quantization_env: "" for spec in SERVICES.values()},
}


def plan(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "embed_ops.launcher", "plan", "--run-dir", str(tmp_path / "run"), *args]
    return subprocess.run(command, cwd=REPO, env={**os.environ, **CLEAN, **env}, capture_output=True, text=True)


def exported(result: subprocess.CompletedProcess) -> dict[str, str]:
    return dict(line.split("\t")[1:3] for line in result.stdout.splitlines() if line.startswith("env\t"))


def test_the_all_profile_fits_a_24_gib_card_with_its_idle_unloading(tmp_path):
    result = plan(tmp_path, "--profile", "all", "--gpu-memory", "24GiB")
    assert result.returncode == 0, result.stderr
    env = exported(result)
    assert env["EMBED_GPU_MEMORY"] == "24GiB" and env["EMBED_GPU_BUDGET_DIR"] == str(tmp_path / "run" / "gpu-budget")
    assert all(env[f"{spec.env_prefix}_IDLE_UNLOAD_SECONDS"] == "300" for spec in SERVICES.values())
    assert "GPU 0: budget 25.8 GB; siglip2_embed 3.3 GB (unloads when idle)" in result.stderr


def test_a_combination_that_cannot_fit_is_refused_before_anything_starts_with_each_services_figure(tmp_path):
    high = plan(tmp_path, "--profile", "high", "--gpu-memory", "12GB")
    assert high.returncode == 2 and "\tstart" not in high.stdout
    assert "REFUSED: the GPU memory budget of GPU 0 (12.0 GB) cannot hold these services" in high.stderr
    for figure in ("siglip2_embed 3.3 GB (none, always loaded", "qwen3_8b_embed 9.0 GB (int8, always loaded"):
        assert figure in high.stderr
    # The user's setting beats the profile's: one 8B service never unloads; the largest other one must fit beside it,
    # with the CUDA contexts of the three more that unload (the 4B reranker runs on the 4B embedder's model and
    # reserves nothing): 9 + 9 + 3 x 0.5 GB.
    pinned = plan(tmp_path, "--profile", "all", "--gpu-memory", "19.4GB", QWEN3_8B_EMBED_IDLE_UNLOAD_SECONDS="0")
    assert pinned.returncode == 2 and "qwen3_8b_embed 9.0 GB (int8, always loaded" in pinned.stderr
    assert "contexts of the other unloaded ones (1.5 GB) need 19.5 GB" in pinned.stderr
    assert "qwen3_4b_rerank" not in pinned.stderr.split("REFUSED")[1]
    fits = plan(tmp_path, "--profile", "all", "--gpu-memory", "19.5GB", QWEN3_8B_EMBED_IDLE_UNLOAD_SECONDS="0")
    assert fits.returncode == 0, fits.stderr


def test_a_fraction_of_the_card_is_taken_of_what_nvidia_smi_reports(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\nprintf "0, 24564\\n"\n')  # a 24 GB card, in MiB
    (bin_dir / "nvidia-smi").chmod(0o755)
    result = plan(tmp_path, "--profile", "all", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    assert exported(result)["EMBED_GPU_MEMORY"] == "0.9"  # the profile's
    assert f"GPU 0: budget {0.9 * 24564 * 2**20 / 1e9:.1f} GB" in result.stderr


def test_the_start_script_passes_its_budget_and_stops_on_a_refusal(tmp_path):
    env = {**os.environ, **CLEAN, "EMBED_RUN_DIR": str(tmp_path / "run"), "EMBED_LOG_DIR": str(tmp_path / "logs")}
    result = subprocess.run(
        ["bash", str(REPO / "start_embed_server.sh"), "--profile", "high", "--gpu-memory", "12GB"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "REFUSED" in result.stderr and "starting" not in result.stdout
    malformed = subprocess.run(
        ["bash", str(REPO / "start_embed_server.sh"), "--profile", "high", "--gpu-memory=lots"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert malformed.returncode != 0 and "EMBED_GPU_MEMORY='lots': not a size" in malformed.stderr
    assert "starting" not in malformed.stdout
