"""A GPU memory budget shared by the services of one machine (`EMBED_GPU_MEMORY`: `24GiB`, or `0.9` of the card).

Each service process that holds a model on a GPU reserves its figure (`service_figure`: measured where a GPU run
measured it, else an estimate) in a ledger, one small JSON file per GPU in a runtime directory
(`EMBED_GPU_BUDGET_DIR`), read and rewritten under a file lock. A service loads only once its reservation fits; when
it does not, it asks the least recently used loaded services that serve no request to unload (a flag in their
entry, which each one's watch reads every POLL_SECONDS), and waits for them. A service without idle unloading is
pinned: it is never asked. Crash safety: an entry names its process (pid and start time), and every reading drops
the entries of processes that are gone, so a service killed while it loads or unloads holds nothing after; the
lock is an flock, which the kernel releases with the process, and the file is replaced whole, never half written.

No HTTP here and no process is started or signalled: the services coordinate through the file only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from embed_core.errors import ModelLoadError
from embed_core.memory import (
    CONTEXT_GB,
    Figure,
    parse_budget,
    service_figure,
)

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a waiting load looks again, and a loaded service reads its entry
# An eviction request is honoured while fresh: the waiting service renews it at each look, so a request whose
# service got its memory elsewhere, gave up or died stops unloading others within this long.
EVICTION_FRESH_SECONDS = 3.0


class BudgetFull(ModelLoadError):
    """The budget has no room for this model now (others are serving), or (NeverFits) ever."""


class NeverFits(BudgetFull):
    pass


# -- the ledger -----------------------------------------------------------------------------------------


@dataclass
class Entry:
    name: str
    bytes: int
    pinned: bool
    started: float  # the process's start time: a pid the system reused for another process is not this one
    state: str = "loading"  # loading | loaded | unloaded (its CUDA context only)
    last_used: float = 0.0  # wall-clock time of the last request (for least-recently-used)
    serving: bool = False  # a request was in flight at the last look
    evict_at: float = 0.0  # when a waiting service last asked this one to unload


def process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def process_alive(pid: int, started: float) -> bool:
    now = process_started(pid)
    return now is not None and abs(now - started) < 1.0


def runtime_directory() -> Path:
    configured = os.environ.get("EMBED_GPU_BUDGET_DIR", "").strip()
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_RUNTIME_DIR", "").strip() or tempfile.gettempdir()
    return Path(base) / f"embed-services-{os.getuid()}" / "gpu-budget"


class Ledger:
    """One process's view of the ledger of one GPU: its own entry, and the decisions that need all of them."""

    def __init__(
        self,
        path: Path,
        budget: int,
        *,
        pid: int | None = None,
        alive: Callable[[int, float], bool] = process_alive,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path, self.budget = path, budget
        self.pid = pid if pid is not None else os.getpid()
        self.started = process_started(self.pid) or 0.0
        self._alive, self._clock = alive, clock

    @contextlib.contextmanager
    def _entries(self) -> Iterator[dict[str, Entry]]:
        """The live entries, under the lock; what the block leaves in the dict is written back whole."""
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            try:
                raw = json.loads(self.path.read_text())
            except (OSError, ValueError):  # none yet (a damaged one is rebuilt: every live service re-enters)
                raw = {}
            entries = {}
            for key, fields in raw.items():
                with contextlib.suppress(TypeError, ValueError):
                    entry = Entry(**fields)
                    if self._alive(int(key), entry.started):
                        entries[key] = entry
            before = json.dumps({key: asdict(entry) for key, entry in entries.items()}, sort_keys=True)
            yield entries
            after = json.dumps({key: asdict(entry) for key, entry in entries.items()}, sort_keys=True)
            if after != before or len(entries) != len(raw):
                temporary = self.path.with_name(f"{self.path.name}.{self.pid}.tmp")
                temporary.write_text(after)
                os.replace(temporary, self.path)

    def entries(self) -> dict[str, Entry]:
        with self._entries() as entries:
            return dict(entries)

    def try_reserve(self, name: str, nbytes: int, pinned: bool) -> str | None:
        """Reserve `nbytes` if they fit; else ask the least recently used idle services to unload and return why
        this one waits. Raises NeverFits when no unloading could make room."""
        me = str(self.pid)
        with self._entries() as entries:
            entries.pop(me, None)
            used = sum(entry.bytes for entry in entries.values())
            if used + nbytes <= self.budget:
                entries[me] = Entry(name, nbytes, pinned, self.started, last_used=self._clock())
                return None
            fixed = [entry for entry in entries.values() if entry.pinned or entry.state == "unloaded"]
            unmovable = sum(entry.bytes for entry in fixed)
            if unmovable + nbytes > self.budget:
                others = ", ".join(f"{e.name} {e.bytes / 1e9:.1f} GB" for e in fixed)
                raise NeverFits(
                    f"{name} needs {nbytes / 1e9:.1f} GB of the {self.budget / 1e9:.1f} GB budget, and the services "
                    f"that never unload (or their CUDA contexts, unloaded) hold {unmovable / 1e9:.1f} GB ({others})"
                )
            idle = sorted(
                (e for e in entries.values() if not e.pinned and e.state == "loaded" and not e.serving),
                key=lambda e: e.last_used,
            )
            needed, asked = used + nbytes - self.budget, []
            for entry in idle:
                if needed <= 0:
                    break
                entry.evict_at = self._clock()
                needed -= entry.bytes
                asked.append(entry.name)
            held = ", ".join(f"{e.name} {e.bytes / 1e9:.1f} GB ({e.state})" for e in entries.values())
            return (
                f"{name} needs {nbytes / 1e9:.1f} GB, {(self.budget - used) / 1e9:.1f} GB of the "
                f"{self.budget / 1e9:.1f} GB budget is free (held: {held}); "
                + (f"asked {', '.join(asked)} to unload" if asked else "waiting for a service to finish its request")
            )

    def reserve(self, name: str, nbytes: int, pinned: bool, wait_seconds: float) -> None:
        """try_reserve until it succeeds; BudgetFull, with the last reason, after `wait_seconds`."""
        deadline = time.monotonic() + wait_seconds
        said = False
        while (reason := self.try_reserve(name, nbytes, pinned)) is not None:
            if not said:
                log.info("waiting for GPU memory: %s", reason)
                said = True
            if time.monotonic() >= deadline:
                raise BudgetFull(f"the GPU memory budget is full after waiting {wait_seconds:g} s: {reason}")
            time.sleep(POLL_SECONDS)

    def mark_loaded(self) -> None:
        with self._entries() as entries:
            entry = entries.get(str(self.pid))
            if entry is not None:
                entry.state = "loaded"

    def release(self, keep: int = 0) -> None:
        """Give the reservation back, all of it or (an unload: the process keeps its CUDA context) all but `keep`."""
        with self._entries() as entries:
            entry = entries.pop(str(self.pid), None)
            if entry is not None and keep:
                entry.bytes, entry.state, entry.serving = keep, "unloaded", False
                entries[str(self.pid)] = entry

    def publish(self, serving: bool, last_used: float) -> bool:
        """Record whether a request is in flight and when the last one ended; returns whether a waiting service
        asks this one to unload (recently enough to still need it)."""
        with self._entries() as entries:
            entry = entries.get(str(self.pid))
            if entry is None:
                return False
            entry.serving, entry.last_used = serving, last_used
            return self._clock() - entry.evict_at < EVICTION_FRESH_SECONDS


@dataclass(frozen=True)
class ServiceBudget:
    """One service's reservation: its figure, whether it is pinned, and its GPU's ledger."""

    ledger: Ledger
    figure: Figure
    pinned: bool

    def reserve(self, wait_seconds: float) -> None:
        self.ledger.reserve(self.figure.seed_name, self.figure.bytes, self.pinned, wait_seconds)

    def loaded(self) -> None:
        self.ledger.mark_loaded()

    def release(self) -> None:
        self.ledger.release(keep=int(CONTEXT_GB * 1e9))

    def publish(self, serving: bool, last_used: float) -> bool:
        return self.ledger.publish(serving, last_used)


def budget_for(seed_name: str, params_billion: float, quantization: str, device: str, gpu_memory: str,
               pinned: bool) -> ServiceBudget | None:  # fmt: skip
    """The service's reservation when EMBED_GPU_MEMORY is set and it runs on a GPU; None otherwise."""
    if not gpu_memory.strip() or not device.startswith("cuda"):
        return None
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    try:
        budget = parse_budget(gpu_memory, torch.cuda.get_device_properties(index).total_memory)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    ledger = Ledger(runtime_directory() / f"gpu{index}.json", budget)
    return ServiceBudget(ledger, service_figure(seed_name, quantization, params_billion), pinned)
