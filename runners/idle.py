"""Idle unloading: a runner that gives its model's memory back after `<NAME>_IDLE_UNLOAD_SECONDS` without a
request, and loads it again for the next one.

`hold_runner` is what a service builds its runner with: with the setting off (the default) it is the runner
itself; on, an `IdleUnloading` that stands in for it. Every coroutine method of the runner (embed, rank,
tokenize...) goes through `use()`, which loads the model first when it is unloaded (concurrent requests share
one load) and counts the request in flight, so that the idle check never unloads a model that is serving.
While unloaded, the plain facts a service reads without awaiting (its settings, max_length, prompts) come from
a light copy of the last runner that holds no model (each runner class names them in KEPT_WHEN_UNLOADED).

The idle check is a method (`unload_if_idle`) on an injectable clock, so tests call it instead of waiting.
This module knows no HTTP: a load that fails or takes longer than `<NAME>_LOAD_WAIT_SECONDS` is an
Overloaded error (service.py and embed_http/ answer it with a 503).

With a GPU memory budget (EMBED_GPU_MEMORY, runners/gpu_budget.py) every load first reserves the service's figure,
waiting while the least recently used idle services unload, and every unload gives it back; a watch reads the
service's entry every POLL_SECONDS and unloads the model when a waiting service asks and no request is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import math
import sys
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Literal, TypeVar

from embed_core.config import RunnerConfig
from embed_core.errors import Overloaded
from embed_core.table import ServiceSpec

from .gpu_budget import POLL_SECONDS, ServiceBudget, budget_for

log = logging.getLogger(__name__)

R = TypeVar("R")
ModelState = Literal["loaded", "unloading", "unloaded", "loading"]


def hold_runner(spec: ServiceSpec, runner_class: Callable[[ServiceSpec], R]) -> R:
    """The runner a service serves with: the runner itself, or (IDLE_UNLOAD_SECONDS set) one that unloads when idle.

    The model is loaded here either way, as the service starts, so that a broken model stops the start. With a GPU
    memory budget it is reserved first; a service without idle unloading holds its reservation while it runs."""
    config = RunnerConfig.from_env(spec)
    budget = service_budget(spec, config)
    started = time.perf_counter()
    runner = reserved(budget, config.load_wait_seconds, lambda: runner_class(spec))
    if not config.idle_unload_seconds:
        return runner
    holder: IdleUnloading[R] = IdleUnloading(
        lambda: runner_class(spec),
        idle_seconds=config.idle_unload_seconds,
        load_wait_seconds=config.load_wait_seconds,
        name=spec.seed_name,
        budget=budget,
    )
    holder.adopt(runner)
    holder.last_load_seconds = time.perf_counter() - started  # what a request waiting for a load is told to wait
    return holder  # type: ignore[return-value]  # it stands in for the runner: see __getattr__


def service_budget(spec: ServiceSpec, config: RunnerConfig) -> ServiceBudget | None:
    """The service's share of EMBED_GPU_MEMORY; None without a budget or off the GPU."""
    if not config.gpu_memory:
        return None
    from .loading import pick_device

    device = str(pick_device(config))
    return budget_for(
        spec.seed_name, spec.params_billion, config.quantization, device, config.gpu_memory,
        pinned=not config.idle_unload_seconds,
    )  # fmt: skip


def reserved(budget: ServiceBudget | None, wait_seconds: float, build: Callable[[], R]) -> R:
    """`build()` once the budget has room for it (waiting for idle services to unload); its reservation is given
    back if the build fails."""
    if budget is None:
        return build()
    budget.reserve(wait_seconds)
    try:
        runner = build()
    except BaseException:
        budget.release()
        raise
    budget.loaded()
    return runner


def release_memory(uses_cuda: bool) -> None:
    """After the last reference to a model is dropped: collect it, hand the GPU's cached blocks back to the driver,
    and (Linux, glibc) the heap's free pages back to the OS, which free() alone keeps for reuse."""
    gc.collect()
    if uses_cuda:
        import torch

        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class IdleUnloading(Generic[R]):
    """Stands in for a runner whose model is dropped after `idle_seconds` without a request, and loaded again
    (by `build`, in a thread of its own, so the event loop keeps answering) when the next request comes."""

    def __init__(
        self,
        build: Callable[[], R],
        *,
        idle_seconds: float,
        load_wait_seconds: float,
        name: str,
        clock: Callable[[], float] = time.monotonic,
        budget: ServiceBudget | None = None,
    ) -> None:
        self._build = build
        self._budget = budget
        self.idle_seconds = idle_seconds
        self.load_wait_seconds = load_wait_seconds
        self._clock = clock  # seconds; tests advance a clock of their own and call unload_if_idle
        self._runner: R | None = None
        self._light: R | None = None  # the last runner's plain facts, no model (see _light_copy)
        self._described: dict[str, Any] = {}
        self._kept: dict[str, Any] = {}  # what the next runner's queue takes over: its metrics observer, its counters
        self._loading: asyncio.Future[R] | None = None  # the one load that every waiting request shares
        self._freeing: asyncio.Future[None] | None = None  # done once an unload has returned the memory
        self._in_flight = 0
        self._last_used = clock()
        self.loads = 0  # loads after the first, for /health and the tests
        self.last_load_seconds: float | None = None
        self.load_error: str | None = None  # why the last load failed, until one succeeds
        # Loads and frees run one at a time, in order: a load waits for the memory of an unload to be returned.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-load")
        self._timer: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    # -- what the service sees --------------------------------------------------------------------------

    @property
    def state(self) -> ModelState:
        if self._runner is not None:
            return "loaded"
        if self._loading is not None:
            return "loading"
        # Until the memory is returned: "unloaded" then means the memory is back (what a reading of it may rely on).
        return "unloading" if self._freeing is not None else "unloaded"

    def __getattr__(self, name: str) -> Any:
        """The runner's attributes: its coroutine methods through use() (the model loaded first); anything else
        from the loaded runner, or while unloaded from the light copy of the last one."""
        if name.startswith("__") or name in ("_runner", "_light"):  # never proxied (copying, pickling, __init__)
            raise AttributeError(name)
        runner = self._runner if self._runner is not None else self._light
        if runner is None:
            raise AttributeError(name)
        if inspect.iscoroutinefunction(inspect.getattr_static(type(runner), name, None)):

            async def call(*args: Any, **kwargs: Any) -> Any:
                async with self.use() as loaded:
                    return await getattr(loaded, name)(*args, **kwargs)

            return call
        return getattr(runner, name)

    def describe(self) -> dict[str, Any]:
        runner = self._runner
        described = runner.describe() if runner is not None else dict(self._described)  # type: ignore[attr-defined]
        described.update(model_state=self.state, idle_unload_seconds=self.idle_seconds, reloads=self.loads)
        if self.last_load_seconds is not None:
            described["last_load_seconds"] = round(self.last_load_seconds, 3)
        if self.load_error is not None:
            described["load_error"] = self.load_error
        if self._budget is not None:  # what this service reserves of EMBED_GPU_MEMORY while loaded
            described["gpu_budget_gb"] = round(self._budget.figure.gigabytes, 2)
        return described

    def close(self) -> None:
        for task in (self._timer, self._watch):
            if task is not None:
                task.cancel()
        if self._runner is not None:
            self._runner.close()  # type: ignore[attr-defined]
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- requests -----------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[R]:
        """The loaded runner, for one request; counted in flight until the request is done with it."""
        self._in_flight += 1  # before any await: the idle check must not unload under a request that waits
        try:
            yield await self._ready()
        finally:
            self._in_flight -= 1
            self._last_used = self._clock()

    async def _ready(self) -> R:
        if self._runner is not None:
            return self._runner
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load())
            # A load whose every waiter gave up still ends; its error is then read here, not logged as lost.
            self._loading.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(self._loading), self.load_wait_seconds)
        except TimeoutError:
            expected = self.last_load_seconds or self.load_wait_seconds
            raise Overloaded(
                f"the model is loading again after being unloaded while idle (waited {self.load_wait_seconds:g} s); "
                "try again shortly",
                retry_after=min(60, max(1, math.ceil(expected))),
            ) from None

    async def _load(self) -> R:
        loop = asyncio.get_running_loop()
        try:
            if self._freeing is not None:
                await self._freeing
            started = time.perf_counter()  # a duration, not the idle clock's business
            runner = await loop.run_in_executor(self._executor, self._build_and_settle)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading the model again failed: %s", self.load_error)
            raise Overloaded(f"the model could not be loaded again ({self.load_error}); try again later") from exc
        finally:
            self._loading = None
        self.last_load_seconds = time.perf_counter() - started
        self.loads += 1
        self.adopt(runner)
        log.info("model loaded again in %.1f s", self.last_load_seconds)
        return runner

    def _build_and_settle(self) -> R:
        runner = reserved(self._budget, self.load_wait_seconds, self._build)
        # As at start-up (service.finish_start_up): what stays alive is moved out of the collector's reach.
        gc.collect()
        gc.freeze()
        return runner

    def adopt(self, runner: R) -> None:
        """Serve with `runner` (just built): its queue takes over the metrics and counters of the last one."""
        batcher = runner.batcher  # type: ignore[attr-defined]
        for name, value in self._kept.items():
            setattr(batcher, name, value)
        self._runner, self._light, self.load_error = runner, None, None
        self._last_used = self._clock()

    # -- idle ---------------------------------------------------------------------------------------------

    def seconds_until_idle(self) -> float:
        """How long until the idle check may unload (idle_seconds again when nothing is loaded or a request runs:
        a request's end or a load restarts the count, and the check after this sleep computes what is left)."""
        if self._runner is None or self._in_flight:
            return max(self.idle_seconds, 0.1)
        return max(0.0, self.idle_seconds - (self._clock() - self._last_used))

    async def unload_if_idle(self) -> bool:
        """Unload the model when no request has used it for idle_seconds and none is in flight. Returns whether
        it did; the memory is returned (in the load thread) before the next load starts."""
        if self._clock() - self._last_used < self.idle_seconds:
            return False
        return await self.unload_unless_serving()

    async def unload_unless_serving(self) -> bool:
        """Unload the model now unless a request is in flight (what the budget's eviction asks)."""
        runner = self._runner
        if runner is None or self._in_flight:
            return False
        self._runner = None  # from here on a request starts a load, which waits for the freeing below
        loop = asyncio.get_running_loop()
        freed: asyncio.Future[None] = loop.create_future()
        self._freeing = freed
        try:
            self._described = runner.describe()  # type: ignore[attr-defined]
            self._light = _light_copy(runner)
            batcher = runner.batcher  # type: ignore[attr-defined]
            self._kept = {"observer": batcher.observer, "stats": batcher.stats}
            uses_cuda = str(self._described.get("device", "")).startswith("cuda")
            runner.close()  # type: ignore[attr-defined]
            await batcher.stopped()  # its worker task, which holds the runner, has ended
            await asyncio.sleep(0)  # and the loop's callbacks that still held that task have run
            gone = weakref.ref(runner)
            del runner, batcher
            await loop.run_in_executor(self._executor, self._free, uses_cuda)
            if self._budget is not None:  # after the memory is back, never before
                await loop.run_in_executor(self._executor, self._budget.release)
            if gone() is not None:  # memory not returned: say so rather than report an unload that freed nothing
                log.warning("the unloaded runner is still referenced, its memory is not freed: %s", _holders(gone()))
        finally:
            self._freeing = None
            freed.set_result(None)
        log.info("model unloaded")
        return True

    @staticmethod
    def _free(uses_cuda: bool) -> None:
        gc.unfreeze()  # start-up froze the model's objects: cycles among them are collected only once unfrozen
        release_memory(uses_cuda)
        gc.freeze()

    def start_idle_timer(self) -> None:
        """Check for idleness from now on, in the running event loop (the service's start-up hook calls this)."""
        if self._timer is None or self._timer.done():
            self._timer = asyncio.get_running_loop().create_task(self._run_idle_timer())
        if self._budget is not None and (self._watch is None or self._watch.done()):
            self._watch = asyncio.get_running_loop().create_task(self._run_budget_watch())

    async def _run_idle_timer(self) -> None:
        while True:
            await asyncio.sleep(self.seconds_until_idle())
            try:
                await self.unload_if_idle()
            except Exception:  # an unload that fails must not end the timer
                log.exception("unloading the idle model failed")

    async def answer_budget(self) -> bool:
        """Tell the budget whether a request is in flight and when the last ended; unload when a waiting service
        asks and none is in flight. Returns whether it unloaded."""
        assert self._budget is not None
        last_used = time.time() - (self._clock() - self._last_used)  # the ledger compares wall-clock times
        asked = await asyncio.to_thread(self._budget.publish, self._in_flight > 0, last_used)
        if asked and self._runner is not None and not self._in_flight:
            log.info(
                "unloading the model: a service waiting for GPU memory asked, and this one was used least recently"
            )
            return await self.unload_unless_serving()
        return False

    async def _run_budget_watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                await self.answer_budget()
            except Exception:  # a failed look must not end the watch
                log.exception("reading the GPU memory budget failed")


def _light_copy(runner: Any) -> Any:
    """The runner's plain facts without its model: its class's KEPT_WHEN_UNLOADED attributes, on an object of the
    same class (so that its methods that read only those, such as prompts(), still answer)."""
    light = object.__new__(type(runner))
    kept = getattr(type(runner), "KEPT_WHEN_UNLOADED", ())
    light.__dict__.update({name: value for name, value in vars(runner).items() if name in kept})
    return light


def _holders(obj: Any) -> list[str]:
    """What still refers to `obj` (for the warning above): the referrers' types."""
    return [type(referrer).__name__ for referrer in gc.get_referrers(obj)]
