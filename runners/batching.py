"""Batching: the queue that merges concurrent requests, and the planner that cuts a batch into forward passes.

As in text-embeddings-inference: requests go into one queue; whenever the model is free, the
worker takes everything waiting (up to a cap) as one batch, so under load batches grow by
themselves and an idle service answers at once. Inside a batch, items are sorted by token length
and cut into micro-batches under a padded-token budget, so long texts cannot exhaust memory and
short texts are never padded to long ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import torch

from embed_core.errors import InputError, Overloaded

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


CHARS_PER_TOKEN_GUESS = 3  # for the queue's scheduling only: the model's thread tokenizes later


def text_cost(max_tokens: int) -> Callable[[Any], int]:
    """A text's cost to the queue: its tokens when it comes tokenized, else about one per three characters;
    at most max_tokens (a longer text is cut there)."""

    def cost(item: str | list[int]) -> int:
        tokens = len(item) if isinstance(item, list) else len(item) // CHARS_PER_TOKEN_GUESS + 1
        return min(max_tokens, tokens)

    return cost


def runner_batcher(
    process: Callable[[list[Item]], list[Result]], spec: Any, config: Any, cost: Callable[[Item], int] | None = None
) -> Batcher[Item, Result]:
    """The one queue of a runner, sized by its settings (a RunnerConfig) and named after its service (a ServiceSpec)."""
    return Batcher(
        process,
        max_batch_items=config.max_batch_items,
        name=spec.seed_name,
        max_queued_items=config.max_queued_items,
        cost=cost,
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


@dataclass(eq=False)  # compared by identity: two callers may send equal items
class _Job(Generic[Item]):
    """One caller's items. Bulk jobs may be cut into slices over several rounds, always in order."""

    items: list[Item]
    future: asyncio.Future
    enqueued_at: float
    cumulative_cost: list[int]  # cumulative_cost[i]: the cost of items[:i]
    taken: int = 0  # items handed to rounds so far
    results: list[Any] = field(default_factory=list)

    def items_within(self, budget: float) -> int:
        """How many of the remaining items fit `budget` (at least one)."""
        end = bisect_right(self.cumulative_cost, self.cumulative_cost[self.taken] + budget) - 1
        return max(1, end - self.taken)


class _Slice(NamedTuple):
    job: _Job[Any]
    start: int
    stop: int

    @property
    def cost(self) -> int:
        return self.job.cumulative_cost[self.stop] - self.job.cumulative_cost[self.start]


# While someone searches, a bulk round may last this many times the compute of a lone request's round:
# the search then waits at most one such slice ahead of its own round. A request that fits such a slice
# whole is "small". With no search for a while, slices are longer (fewer, more efficient passes), and the
# first search after the quiet waits at most one of those: so they last at most QUIET_SLICE_SECONDS (where
# a lone round is that slow already, on a CPU, longer slices gain nothing anyway).
SLICE_FACTOR = 2.0
QUIET_SLICE_FACTOR = 25.0
QUIET_SLICE_SECONDS = 0.5
# How long after the last small request arrived next to bulk work the bulk stays cut into slices.
INTERACTIVE_HOLD_SECONDS = 10.0


@dataclass
class RoundTimer:
    """What the queue learns of the model's speed: the compute time of a round that held one request whole
    (the fastest of the recent ones: an idle search), and seconds per unit of cost (decayed sums, so that
    large rounds weigh most and the figure follows the load)."""

    lone_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    seconds: float = 0.0
    cost: float = 0.0

    def record(self, jobs_whole: int, cost: int, seconds: float) -> None:
        if jobs_whole == 1:
            self.lone_seconds.append(seconds)
        self.seconds, self.cost = 0.9 * self.seconds + seconds, 0.9 * self.cost + cost

    def slice_cost(self, quiet: bool = False) -> float | None:
        """The cost a bulk slice may hold, next to searches or in a quiet spell; None until the speeds are known."""
        if not self.lone_seconds or self.cost <= 0 or self.seconds <= 0:
            return None
        lone = min(self.lone_seconds)
        seconds = SLICE_FACTOR * lone
        if quiet:
            seconds = max(seconds, min(QUIET_SLICE_FACTOR * lone, QUIET_SLICE_SECONDS))
        return seconds * self.cost / self.seconds


class Batcher(Generic[Item, Result]):
    """One queue in front of one model. `await submit(items)` returns their results, in order.

    `process(items) -> results` runs in a single worker thread (the model is not re-entrant), so the
    event loop stays free to parse and queue the next requests while a batch computes.

    Small requests (a search: its whole cost fits one slice) go ahead of bulk work. While they arrive next
    to bulk work, rounds alternate between the small requests waiting and one time-capped slice of the bulk
    (cut by `cost(item)`, e.g. its characters), so a search waits for one slice, not a whole bulk round,
    and bulk work still moves. Without small requests bulk runs in whole rounds, as fast as before.
    """

    def __init__(
        self,
        process: Callable[[list[Item]], list[Result]],
        *,
        max_batch_items: int,
        name: str,
        max_queued_items: int = 8192,
        cost: Callable[[Item], int] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._process = process
        self._clock = clock  # seconds; the tests' stand-in models advance a clock of their own
        self._max_batch_items = max_batch_items
        self._max_queued_items = max_queued_items
        self._cost = cost or (lambda item: 1)
        self._queue: deque[_Job[Item]] = deque()
        self._queued_items = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-model")
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._last_batch = (0, 0.0)  # items, compute seconds
        self.timer = RoundTimer()
        self._interactive_until = 0.0
        self._last_round_bulk = False
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
        job = _Job(items, loop.create_future(), self._clock(), [0, *accumulate(map(self._cost, items))])
        self._queue.append(job)
        self._queued_items += len(items)
        assert self._wakeup is not None
        self._wakeup.set()
        return await job.future

    def _take(self) -> list[_Slice]:
        """The next round: small requests first and whole; bulk work in time-capped slices between them."""
        for job in [job for job in self._queue if job.future.done()]:  # the caller went away: skip its work
            self._drop(job)
        small_cost = self.timer.slice_cost()
        # By the whole request's cost: the rest of a bulk request being sliced is still bulk, not a search.
        small = [job for job in self._queue if small_cost is None or job.cumulative_cost[-1] <= small_cost]
        bulk = [job for job in self._queue if small_cost is not None and job.cumulative_cost[-1] > small_cost]
        now = self._clock()
        if small and (bulk or self._last_round_bulk):  # a small request waited behind bulk work
            self._interactive_until = now + INTERACTIVE_HOLD_SECONDS
        if small and (not bulk or self._last_round_bulk):  # alternate, so that bulk work is never starved
            round_ = self._whole_jobs(small)
        else:
            round_ = self._bulk_slice(bulk, self.timer.slice_cost(quiet=now >= self._interactive_until) or 0.0)
        self._last_round_bulk = any(piece.job in bulk for piece in round_)
        for piece in round_:
            piece.job.taken = piece.stop
            self._queued_items -= piece.stop - piece.start
            if piece.stop == len(piece.job.items):
                self._queue.remove(piece.job)
        return round_

    def _whole_jobs(self, jobs: list[_Job[Item]]) -> list[_Slice]:
        """Jobs in arrival order, whole (what is left of each), up to max_batch_items (the first one always)."""
        round_, count = [], 0
        for job in jobs:
            size = len(job.items) - job.taken
            if round_ and count + size > self._max_batch_items:
                break
            round_.append(_Slice(job, job.taken, len(job.items)))
            count += size
        return round_

    def _bulk_slice(self, jobs: list[_Job[Item]], budget: float) -> list[_Slice]:
        """Items of the bulk jobs in arrival order, up to `budget` of cost and max_batch_items (one at least)."""
        round_, count = [], 0
        for job in jobs:
            take = min(job.items_within(budget), len(job.items) - job.taken, self._max_batch_items - count)
            piece = _Slice(job, job.taken, job.taken + take)
            if round_ and (take < 1 or piece.cost > budget):
                break
            round_.append(piece)
            budget -= piece.cost
            count += take
            if budget <= 0 or count >= self._max_batch_items:
                break
        return round_

    def _drop(self, job: _Job[Item]) -> None:
        self._queue.remove(job)
        self._queued_items -= len(job.items) - job.taken

    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._wait_for_returning_callers()
                round_ = self._take()
                if round_:
                    await self._run(round_)

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
        while self._queued_items < last_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _run(self, round_: list[_Slice]) -> None:
        loop = asyncio.get_running_loop()
        items = [item for piece in round_ for item in piece.job.items[piece.start : piece.stop]]
        started = self._clock()
        try:
            results = await loop.run_in_executor(self._executor, self._process, items)
        except Exception as exc:
            if len(round_) > 1:
                # Find the request that broke the batch; the others must still be answered.
                for piece in round_:
                    await self._run([piece])
                return
            self._fail(round_[0].job, exc)
            return
        finished = self._clock()
        cost = sum(piece.cost for piece in round_)
        whole = sum(1 for piece in round_ if piece.start == 0 and piece.stop == len(piece.job.items))
        self.timer.record(whole if whole == len(round_) else 0, cost, finished - started)
        self._last_batch = (len(items), finished - started)
        self.stats.record(len(items))
        waits = [started - piece.job.enqueued_at for piece in round_ if piece.start == 0]
        self._tell("round_done", len(items), waits, finished - started)
        offset = 0
        for piece in round_:
            size = piece.stop - piece.start
            piece.job.results.extend(results[offset : offset + size])
            offset += size
            if len(piece.job.results) == len(piece.job.items):
                _settle(piece.job.future, result=piece.job.results)

    def _fail(self, job: _Job[Item], exc: Exception) -> None:
        """One request's items failed: its caller gets the error, and the rest of its items are not run."""
        if job in self._queue:
            self._drop(job)
        _settle(job.future, error=exc)
        if not isinstance(exc, (InputError, Overloaded)):
            log.exception("batch failed", exc_info=exc)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def stopped(self) -> None:
        """After close(): wait until the worker task and the model's thread have ended. Both hold the runner's
        process function for a while (the thread until it takes its next work item), so its model lives until then."""
        if self._worker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await asyncio.to_thread(self._executor.shutdown, True)  # a round still computing for a gone caller ends first


def _settle(future: asyncio.Future, *, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
