"""The CPU's micro-batch planner (least padding + a cost per forward pass) and the batcher under steady load."""

from __future__ import annotations

import asyncio
import itertools
import random

from runners.batching import Batcher, plan_least_padding


def plan_cost(lengths, plan, call_cost):
    return sum(call_cost + len(batch) * max(lengths[i] for i in batch) for batch in plan)


def brute_force_least_cost(lengths, max_tokens, call_cost, max_items):
    """Every way to cut the longest-first order into runs, each within the budget (or a single item)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        runs, current = [], [order[0]]
        for index, cut in zip(order[1:], cuts, strict=True):
            if cut:
                runs.append(current)
                current = []
            current.append(index)
        runs.append(current)
        fits = all(
            len(run) == 1 or (len(run) <= max_items and len(run) * max(lengths[i] for i in run) <= max_tokens)
            for run in runs
        )
        if fits:
            best = min(best, plan_cost(lengths, runs, call_cost))
    return best


def test_least_padding_plan_is_optimal_and_complete():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([1, 3, 8, 9, 20, 21, 40, 100]) for _ in range(rng.randint(1, 9))]
        max_tokens, call_cost, max_items = (
            rng.choice([64, 200, 10_000]),
            rng.choice([0, 8, 32, 1000]),
            rng.randint(1, 9),
        )
        plan = plan_least_padding(lengths, max_tokens, call_cost, max_items)
        assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
        for batch in plan:
            assert len(batch) == 1 or (
                len(batch) <= max_items and len(batch) * max(lengths[i] for i in batch) <= max_tokens
            )
        assert plan_cost(lengths, plan, call_cost) == brute_force_least_cost(lengths, max_tokens, call_cost, max_items)


def test_least_padding_keeps_equal_lengths_together_and_splits_far_apart_lengths():
    assert len(plan_least_padding([20] * 30, 16384, 32, 64)) == 1
    plan = plan_least_padding([100] * 10 + [5] * 10, 16384, 32, 64)
    assert sorted(map(sorted, plan)) == [list(range(10)), list(range(10, 20))]
    assert len(plan_least_padding([100] * 10 + [5] * 10, 16384, 10_000, 64)) == 1  # passes cost more than padding


def test_batches_do_not_alternate_small_and_large_under_steady_load():
    """32 callers that each send again as soon as they are answered: every batch after the first few
    takes all of them, instead of alternating between the few already back and the rest.

    The model's compute is paid on the batcher's clock, not in real time: a pass "takes" tens of seconds, so the
    queue waits up to a quarter of that (real time) for the callers to come back, which on any machine is long
    enough. (The callers' own pauses are real, and take milliseconds.)"""
    clock = [0.0]

    def process(items: list[int]) -> list[int]:
        clock[0] += 10.0 + 1.0 * len(items)  # a fixed cost per pass plus a cost per item
        return items

    async def scenario() -> list[int]:
        batcher: Batcher[int, int] = Batcher(process, max_batch_items=1024, name="test", clock=lambda: clock[0])

        async def caller(index: int) -> None:
            for _ in range(12):
                await batcher.submit([index])
                await asyncio.sleep(0.001 * (index % 3))  # answers reach callers at different times

        await asyncio.gather(*(caller(index) for index in range(32)))
        batcher.close()
        return batcher.stats.batch_sizes

    sizes = asyncio.run(scenario())
    assert sizes == [32] * 12, sizes  # without the wait: 32, then the few already back, the rest, ...
