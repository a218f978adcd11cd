"""The micro-batch planner, the out-of-memory split and the request queue."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from embed_core.errors import Overloaded
from runners import batching
from runners.batching import Batcher, plan_micro_batches, run_in_order, run_splitting_on_oom
from tests.conftest import HANG_GUARD_SECONDS


def test_plan_covers_every_item_once_within_the_token_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    plan = plan_micro_batches(lengths, max_tokens=1024)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    for batch in plan:
        padded = max(lengths[i] for i in batch) * len(batch)
        assert padded <= 1024 or len(batch) == 1


def test_plan_groups_similar_lengths_so_short_texts_are_not_padded_to_long_ones():
    lengths = [500, 3, 4, 480, 5, 6]
    plan = plan_micro_batches(lengths, max_tokens=1000)
    assert plan == [[0, 3], [5, 4, 2, 1]]


def test_an_item_over_the_budget_runs_alone():
    assert plan_micro_batches([5000, 2, 2], max_tokens=100) == [[0], [1, 2]]


def test_plan_respects_an_item_cap():
    assert [len(b) for b in plan_micro_batches([1] * 10, max_tokens=10**6, max_items=4)] == [4, 4, 2]


def test_out_of_memory_halves_the_micro_batch_until_it_fits():
    calls = []

    def run(indices):
        calls.append(len(indices))
        if len(indices) > 2:
            raise torch.OutOfMemoryError("simulated")
        return [i * 10 for i in indices]

    assert run_splitting_on_oom(run, list(range(8))) == [i * 10 for i in range(8)]
    assert calls[0] == 8 and max(calls[1:]) <= 4


def test_an_item_that_does_not_fit_alone_is_overloaded():
    def run(indices):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(Overloaded):
        run_splitting_on_oom(run, [0, 1])


def test_queue_merges_concurrent_submissions_and_keeps_each_callers_order():
    seen_batches = []

    def process(items):
        seen_batches.append(list(items))
        return [item.upper() for item in items]

    batcher = Batcher(process, max_batch_items=100, name="test")

    async def main():
        return await asyncio.gather(*(batcher.submit([f"a{i}", f"b{i}"]) for i in range(20)))

    results = asyncio.run(main())
    assert results == [[f"A{i}", f"B{i}"] for i in range(20)]
    assert len(seen_batches) < 20
    batcher.close()


def test_a_failing_request_does_not_fail_the_requests_batched_with_it():
    def process(items):
        if "poison" in items:
            raise RuntimeError("bad item")
        return items

    batcher = Batcher(process, max_batch_items=100, name="test")

    async def main():
        return await asyncio.gather(
            batcher.submit(["ok1"]), batcher.submit(["poison"]), batcher.submit(["ok2"]), return_exceptions=True
        )

    first, poisoned, last = asyncio.run(main())
    assert first == ["ok1"] and last == ["ok2"]
    assert isinstance(poisoned, RuntimeError)
    batcher.close()


def test_a_full_queue_answers_overloaded_at_once_and_recovers():
    computing, release = threading.Event(), threading.Event()

    def process(items):
        computing.set()
        assert release.wait(HANG_GUARD_SECONDS)
        return items

    batcher = Batcher(process, max_batch_items=4, max_queued_items=6, name="test")

    async def main():
        running = asyncio.ensure_future(batcher.submit(["a"]))  # taken by the worker at once
        assert await asyncio.get_running_loop().run_in_executor(None, computing.wait, HANG_GUARD_SECONDS)
        waiting = [asyncio.ensure_future(batcher.submit(["b", "c", "d"])) for _ in range(2)]  # 6 queued
        for job in waiting:
            await queued(job)
        with pytest.raises(Overloaded):
            await batcher.submit(["e"])
        release.set()
        results = [await running] + [await job for job in waiting]
        return results, await batcher.submit(["f"])  # room again once the queue drains

    results, after = asyncio.run(main())
    assert results == [["a"], ["b", "c", "d"], ["b", "c", "d"]] and after == ["f"]
    batcher.close()


def test_run_in_order_puts_each_result_back_at_its_position():
    items = [f"text {index}" for index in range(10)]
    plan = [[7, 2, 9], [0], [5, 1, 8, 3], [6, 4]]  # passes in any order, as a length-sorted plan gives
    ran: list[list[int]] = []

    def forward(part: list[int]) -> list[str]:
        if len(part) > 2:
            raise torch.OutOfMemoryError("simulated")  # halved until it fits
        ran.append(part)
        return [items[index].upper() for index in part]

    assert run_in_order(plan, forward, len(items)) == [item.upper() for item in items]
    assert sorted(index for part in ran for index in part) == list(range(10))  # each position ran once
    with pytest.raises(RuntimeError, match="covered 9 of 10"):
        run_in_order([[0, 1, 2], [3, 4, 5, 6, 7, 8]], lambda part: [items[index] for index in part], len(items))


# -- a lone search next to bulk work -------------------------------------------------------------------


class TimedModel:
    """A stand-in model: a fixed cost per pass plus a cost per item, paid on a clock of its own (the batcher's), not
    in real time, so that the queue's timing decisions come out the same on any machine. It records every round.

    `hold(prefix)`: the first round whose first item starts with `prefix` waits, once `holding` is set, until the
    test sets `release`, so that a test can send a request while that round computes."""

    def __init__(self, fixed: float = 0.004, per_item: float = 0.001, fail_on: str | None = None) -> None:
        self.fixed, self.per_item, self.fail_on = fixed, per_item, fail_on
        self.rounds: list[list[str]] = []
        self.now = 1000.0
        self.held_prefix: str | None = None
        self.holding, self.release = threading.Event(), threading.Event()

    def clock(self) -> float:
        return self.now

    def hold(self, prefix: str) -> None:
        self.held_prefix = prefix

    def __call__(self, items: list[str]) -> list[str]:
        self.rounds.append(list(items))
        if self.held_prefix is not None and items[0].startswith(self.held_prefix):
            self.held_prefix = None
            self.holding.set()
            assert self.release.wait(HANG_GUARD_SECONDS), "the test never released the held round"
        self.now += self.fixed + self.per_item * len(items)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot read {self.fail_on}")
        return [item.upper() for item in items]

    async def held(self) -> None:
        """Until the held round is computing."""
        assert await asyncio.get_running_loop().run_in_executor(None, self.holding.wait, HANG_GUARD_SECONDS)


def timed_batcher(model: TimedModel) -> Batcher:
    return Batcher(model, max_batch_items=1024, name="test", clock=model.clock)


async def queued(task: asyncio.Future) -> None:
    """Until `task` (a submit just created) has put its items in the queue: it does so at its first step."""
    await asyncio.sleep(0)
    assert not task.done()


async def warm_up(batcher: Batcher) -> None:
    """What a running service has seen before: a lone request, then bulk work alone."""
    await batcher.submit(["warm"])
    await batcher.submit([f"warm-bulk-{i}" for i in range(100)])


def test_a_lone_request_goes_ahead_of_bulk_work_that_is_still_answered_whole_and_in_order():
    model = TimedModel()
    batcher = timed_batcher(model)
    bulk_items = [f"bulk-{i}" for i in range(400)]

    async def scenario():
        await warm_up(batcher)
        model.hold("bulk-")
        bulk = asyncio.ensure_future(batcher.submit(bulk_items))
        await model.held()  # the bulk job's first slice is computing
        search = asyncio.ensure_future(batcher.submit(["search"]))
        await queued(search)
        model.release.set()
        lone = await search
        return lone, bulk.done(), await bulk

    lone, bulk_done_when_lone_answered, bulk = asyncio.run(scenario())
    batcher.close()
    assert lone == ["SEARCH"] and bulk == [item.upper() for item in bulk_items]
    assert not bulk_done_when_lone_answered
    [with_search] = [round_ for round_ in model.rounds if "search" in round_]
    assert with_search == ["search"]  # its own round, not one more slice of the bulk
    bulk_rounds = [round_ for round_ in model.rounds if round_[0].startswith("bulk-")]
    assert len(bulk_rounds) > 1 and sum(bulk_rounds, []) == bulk_items  # cut into slices, in order, none twice


def test_bulk_work_alone_runs_in_longer_slices_than_next_to_searches():
    model = TimedModel()
    batcher = timed_batcher(model)

    async def scenario():
        await warm_up(batcher)
        quiet = await batcher.submit([f"quiet-{i}" for i in range(300)])
        busy = asyncio.ensure_future(batcher.submit([f"busy-{i}" for i in range(300)]))
        while not busy.done():
            await batcher.submit(["search"])
        return quiet, await busy

    quiet, busy = asyncio.run(scenario())
    batcher.close()
    assert quiet == [f"QUIET-{i}" for i in range(300)] and busy == [f"BUSY-{i}" for i in range(300)]
    sizes = {kind: sorted(len(r) for r in model.rounds if r[0].startswith(kind)) for kind in ("quiet", "busy")}
    median = {kind: found[len(found) // 2] for kind, found in sizes.items()}
    assert median["quiet"] >= 3 * median["busy"], sizes  # 25x and 2x a lone request's time


def test_quiet_slices_last_at_most_quiet_slice_seconds(monkeypatch):
    """Where 25 lone rounds take long (a CPU), a quiet slice is capped, so that the first search after a
    quiet spell does not wait for many seconds of bulk work; never below the slice next to searches."""
    monkeypatch.setattr(batching, "QUIET_SLICE_SECONDS", 0.03)  # this stand-in's 25 lone rounds: ~0.125 s
    model = TimedModel()
    batcher = timed_batcher(model)

    async def scenario():
        await warm_up(batcher)
        return await batcher.submit([f"quiet-{i}" for i in range(300)])

    assert asyncio.run(scenario()) == [f"QUIET-{i}" for i in range(300)]
    batcher.close()
    quiet = [round_ for round_ in model.rounds if round_[0].startswith("quiet")]
    assert sum(quiet, []) == [f"quiet-{i}" for i in range(300)]
    seconds = sorted(model.fixed + model.per_item * len(round_) for round_ in quiet[:-1])  # the last is a rest
    assert 0.01 <= seconds[len(seconds) // 2] <= 0.045, seconds  # about the cap, above 2 lone rounds (~0.01 s)


def test_a_stream_of_searches_does_not_starve_bulk_work():
    model = TimedModel()
    batcher = timed_batcher(model)
    bulk_items = [f"bulk-{i}" for i in range(300)]

    async def scenario():
        await warm_up(batcher)
        bulk = asyncio.ensure_future(batcher.submit(bulk_items))
        searches = 0
        while not bulk.done():  # one search always waiting, the next sent as the last is answered
            await asyncio.gather(*(batcher.submit([f"q{searches}-{k}"]) for k in range(3)))
            searches += 1
            assert searches < 2000, "the bulk job never finished"
        return await bulk

    assert asyncio.run(scenario()) == [item.upper() for item in bulk_items]
    batcher.close()
    kinds = ["bulk" if r[0].startswith("bulk-") else "small" for r in model.rounds if not r[0].startswith("warm")]
    last_bulk = len(kinds) - kinds[::-1].index("bulk")
    assert "small, small" not in ", ".join(kinds[:last_bulk])  # while bulk waits, never two search rounds in a row


def test_a_failing_slice_fails_its_own_request_only_and_the_rest_of_it_is_not_run():
    model = TimedModel(fail_on="bulk-150")
    batcher = timed_batcher(model)
    bulk_items = [f"bulk-{i}" for i in range(400)]

    async def scenario():
        await warm_up(batcher)
        model.hold("bulk-")
        bulk = asyncio.ensure_future(batcher.submit(bulk_items))
        await model.held()
        search = asyncio.ensure_future(batcher.submit(["search"]))
        await queued(search)
        model.release.set()
        lone = await search
        with pytest.raises(ValueError, match="bulk-150"):
            await bulk
        return lone, await batcher.submit(["after"])

    assert asyncio.run(scenario()) == (["SEARCH"], ["AFTER"])
    batcher.close()
    ran = [item for round_ in model.rounds for item in round_]
    assert "bulk-399" not in ran  # nobody waits for the rest of the failed request


def test_the_rest_of_a_sliced_bulk_request_is_still_bulk():
    """The last items of a bulk request are as cheap as a search, but they are not one: bulk alone never
    switches the queue into the short slices kept for searches."""
    model = TimedModel()
    batcher = timed_batcher(model)

    async def scenario():
        await warm_up(batcher)
        await asyncio.gather(*(batcher.submit([f"bulk{j}-{i}" for i in range(120)]) for j in range(2)))

    asyncio.run(scenario())
    batcher.close()
    assert batcher._interactive_until == 0.0
