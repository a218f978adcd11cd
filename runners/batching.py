"""Batching: the queue that merges concurrent requests, and the planner that cuts a batch into forward passes.

As in text-embeddings-inference: requests go into one queue; whenever the model is free, the
worker takes everything waiting (up to a cap) as one batch, so under load batches grow by
themselves and an idle service answers at once. Inside a batch, items are sorted by token length
and cut into micro-batches under a padded-token budget, so long texts cannot exhaust memory and
short texts are never padded to long ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

from .errors import InputError, Overloaded

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


def plan_micro_batches(
    lengths: Sequence[int], max_tokens: int, max_items: int | None = None, *, padded: bool = True
) -> list[list[int]]:
    """Group indices into micro-batches of similar length whose size fits max_tokens.

    padded=True counts n x longest (a padded batch); padded=False counts the real tokens (a packed,
    padding-free batch). Longest first, so that a batch that cannot fit fails at its first pass,
    not its last. An item longer than the budget on its own still runs, alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for index in order:
        longest_if_added = max(longest, lengths[index])
        size_if_added = longest_if_added * (len(current) + 1) if padded else total + lengths[index]
        too_many = max_items is not None and len(current) >= max_items
        if current and (size_if_added > max_tokens or too_many):
            batches.append(current)
            current, longest_if_added, total = [], lengths[index], 0
        current.append(index)
        longest = longest_if_added
        total += lengths[index]
    if current:
        batches.append(current)
    return batches


def plan_least_padding(
    lengths: Sequence[int], max_tokens: int, call_cost_tokens: int, max_items: int
) -> list[list[int]]:
    """Micro-batches that minimize padded tokens + call_cost_tokens per forward pass, each under max_tokens.

    For devices where padding costs as much as real tokens (the CPU) and a forward pass has a fixed cost
    of its own: one pass per distinct length wastes that fixed cost, one pass for all pads short texts
    to the longest. In the longest-first order a micro-batch is a run, padded to its first item; dynamic
    programming picks the cuts, in O(len(lengths) x max_items).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    longest_first = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(order)  # best[j]: least cost of the first j items
    cut = [0] * (len(order) + 1)  # cut[j]: where the last micro-batch of that plan starts
    for end in range(1, len(order) + 1):
        for start in range(end - 1, max(-1, end - 1 - max_items), -1):
            size = end - start
            if size > 1 and longest_first[start] * size > max_tokens:
                break  # further left the run is longer and its first item too: never fits again
            cost = best[start] + call_cost_tokens + longest_first[start] * size
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches: list[list[int]] = []
    end = len(order)
    while end > 0:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


def run_splitting_on_oom(run: Callable[[list[int]], list[Result]], indices: list[int]) -> list[Result]:
    """run(indices); when the device runs out of memory, halve the micro-batch and try again.

    One item that does not fit even alone becomes an Overloaded error for its request only.
    """
    try:
        return run(indices)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(indices) == 1:
            raise Overloaded("out of device memory even for a single input; send a shorter text") from None
        log.warning("out of memory on a micro-batch of %d; splitting it", len(indices))
        middle = len(indices) // 2
        return run_splitting_on_oom(run, indices[:middle]) + run_splitting_on_oom(run, indices[middle:])


def run_in_order(
    plan: Sequence[list[int]], forward: Callable[[list[int]], Sequence[Result]], count: int
) -> list[Result]:
    """Each micro-batch of `plan` (positions 0..count-1) through `forward` (halved on out-of-memory), and the
    results put back by position: the answer to position i is result i, whatever the order of the passes."""
    results: dict[int, Result] = {}
    for micro_batch in plan:
        results.update(
            zip(micro_batch, run_splitting_on_oom(lambda part: list(forward(part)), micro_batch), strict=True)
        )
    if len(results) != count:  # a plan that skips or repeats a position is a bug, never a silent gap
        raise RuntimeError(f"the plan covered {len(results)} of {count} positions")
    return [results[position] for position in range(count)]


def runner_batcher(process: Callable[[list[Item]], list[Result]], spec: Any, config: Any) -> Batcher[Item, Result]:
    """The one queue of a runner, sized by its settings (a RunnerConfig) and named after its service (a ServiceSpec)."""
    return Batcher(
        process, max_batch_items=config.max_batch_items, name=spec.seed_name, max_queued_items=config.max_queued_items
    )


@dataclass
class BatchStats:
    """Counters that /health and the tests read (timings and token counts go to the observer's metrics)."""

    batches: int = 0
    items: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # the last few, for the tests

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.batch_sizes = [*self.batch_sizes[-63:], size]


class BatchObserver(Protocol):
    """Told about every round and every forward pass (the service turns this into Prometheus metrics)."""

    def round_done(self, items: int, queued_seconds: Sequence[float], compute_seconds: float) -> None:
        """One round taken from the queue: its size, each request's wait, and the time the model took."""

    def forward_done(self, kind: str, items: int, tokens: int, padded_tokens: int) -> None:
        """One forward pass over `items` inputs of one kind ("text", "pair", "image")."""


@dataclass
class _Job(Generic[Item]):
    items: list[Item]
    future: asyncio.Future
    enqueued_at: float


class Batcher(Generic[Item, Result]):
    """One queue in front of one model. `await submit(items)` returns their results, in order.

    `process(items) -> results` runs in a single worker thread (the model is not re-entrant), so the
    event loop stays free to parse and queue the next requests while a batch computes.
    """

    def __init__(
        self,
        process: Callable[[list[Item]], list[Result]],
        *,
        max_batch_items: int,
        name: str,
        max_queued_items: int = 8192,
    ) -> None:
        self._process = process
        self._max_batch_items = max_batch_items
        self._max_queued_items = max_queued_items
        self._queue: deque[_Job[Item]] = deque()
        self._queued_items = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-model")
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._last_batch = (0, 0.0)  # items, compute seconds
        self.stats = BatchStats()
        self.observer: BatchObserver | None = None

    def forward_done(self, kind: str, items: int, tokens: int = 0, padded_tokens: int = 0) -> None:
        """The runner reports each forward pass here (from the worker thread): sizes and padding."""
        self._tell("forward_done", kind, items, tokens, padded_tokens)

    def _tell(self, event: str, *args: Any) -> None:
        """Metrics must never fail a request: an observer's error is logged, not raised."""
        if self.observer is None:
            return
        try:
            getattr(self.observer, event)(*args)
        except Exception:
            log.exception("batch observer failed on %s", event)

    async def submit(self, items: list[Item]) -> list[Result]:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._work())
        if self._queued_items + len(items) > self._max_queued_items:
            # Answer at once (503) rather than let the wait grow until the request times out.
            raise Overloaded(
                f"{self._queued_items} items are waiting for the model already (at most {self._max_queued_items}); "
                "try again shortly"
            )
        job = _Job(items, loop.create_future(), time.perf_counter())
        self._queue.append(job)
        self._queued_items += len(items)
        assert self._wakeup is not None
        self._wakeup.set()
        return await job.future

    def _take(self) -> list[_Job[Item]]:
        jobs, count = [], 0
        while self._queue and (not jobs or count + len(self._queue[0].items) <= self._max_batch_items):
            job = self._queue.popleft()
            self._queued_items -= len(job.items)
            if job.future.done():  # the caller went away (client disconnected): skip its work
                continue
            jobs.append(job)
            count += len(job.items)
        return jobs

    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._wait_for_returning_callers()
                jobs = self._take()
                if jobs:
                    await self._run(jobs)

    async def _wait_for_returning_callers(self) -> None:
        """Under steady load the callers just answered send their next request at once. Taking only what
        is already queued makes batches alternate small and large (3, 29, 3, 29 with 32 clients), and a
        small batch pays a whole forward pass for a few items. So wait, at most a quarter of the last
        batch's compute time, until as many items are queued as the last batch held. An idle service
        (last batch of one) never waits."""
        last_size, last_compute = self._last_batch
        if last_size <= 1:
            return
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + last_compute / 4
        while sum(len(job.items) for job in self._queue) < last_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _run(self, jobs: list[_Job[Item]]) -> None:
        loop = asyncio.get_running_loop()
        items = [item for job in jobs for item in job.items]
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self._process, items)
        except Exception as exc:
            if len(jobs) > 1:
                # Find the request that broke the batch; the others must still be answered.
                for job in jobs:
                    await self._run([job])
                return
            _settle(jobs[0].future, error=exc)
            if not isinstance(exc, (InputError, Overloaded)):
                log.exception("batch failed", exc_info=exc)
            return
        finished = time.perf_counter()
        waits = [started - job.enqueued_at for job in jobs]
        self._last_batch = (len(items), finished - started)
        self.stats.record(len(items))
        self._tell("round_done", len(items), waits, finished - started)
        offset = 0
        for job in jobs:
            _settle(job.future, result=results[offset : offset + len(job.items)])
            offset += len(job.items)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _settle(future: asyncio.Future, *, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
