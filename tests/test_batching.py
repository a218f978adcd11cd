"""The micro-batch planner, the out-of-memory split and the request queue."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from runners.batching import Batcher, plan_micro_batches, run_in_order, run_splitting_on_oom
from runners.errors import Overloaded


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
    release = __import__("threading").Event()

    def process(items):
        release.wait(5)
        return items

    batcher = Batcher(process, max_batch_items=4, max_queued_items=6, name="test")

    async def main():
        running = asyncio.ensure_future(batcher.submit(["a"]))  # taken by the worker at once
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(batcher.submit(["b", "c", "d"])) for _ in range(2)]  # 6 queued
        await asyncio.sleep(0.05)
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
