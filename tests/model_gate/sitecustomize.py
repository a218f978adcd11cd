"""A test's hold on the model of a `bentoml serve` it started (tests/conftest.py puts this folder on PYTHONPATH, so
every Python process of that server runs it at start-up).

With EMBED_TEST_GATE=<path> set, two classes are wrapped as their modules are imported:
- runners.batching.Batcher: each `submit` (a request's items entering the queue) appends its item count to
  <path>.submitted, and to <path>.cancelled when its request is cancelled (its client left) while it waits;
  each round the model's thread takes appends its item count to <path>.rounds, then waits while the file <path>
  exists, before its forward pass;
- embed_http.clients.ClientDeadlineProtocol: each connection the server sees end appends the client's port to
  <path>.disconnected.
So a test can close the gate, send requests, wait until the server has queued them or seen their clients leave
(not until some time has passed), open the gate, and read how the queue grouped them: no outcome depends on how
fast the machine is.
"""

from __future__ import annotations

import asyncio
import importlib.abc
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from typing import Any

GATE = os.environ.get("EMBED_TEST_GATE", "")


def _append(what: str, line: str) -> None:
    with open(f"{GATE}.{what}", "a") as record:
        record.write(line + "\n")


def _wrap_batcher(module: Any) -> None:
    batcher = module.Batcher
    original_init, original_submit = batcher.__init__, batcher.submit

    def __init__(self: Any, process: Any, *args: Any, **kwargs: Any) -> None:
        def gated(items: list[Any]) -> Any:
            _append("rounds", str(len(items)))
            while os.path.exists(GATE):
                time.sleep(0.005)
            return process(items)

        original_init(self, gated, *args, **kwargs)

    async def submit(self: Any, items: list[Any]) -> Any:
        # Recorded just before the items are queued, with no await between: the event loop (where the queue
        # takes its rounds) cannot take a round in between.
        _append("submitted", str(len(items)))
        try:
            return await original_submit(self, items)
        except asyncio.CancelledError:
            _append("cancelled", str(len(items)))
            raise

    batcher.__init__, batcher.submit = __init__, submit


def _wrap_protocol(module: Any) -> None:
    protocol = module.ClientDeadlineProtocol
    original_lost = protocol.connection_lost

    def connection_lost(self: Any, exc: Exception | None) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        original_lost(self, exc)
        _append("disconnected", str(peer[1] if peer else 0))

    protocol.connection_lost = connection_lost


WRAPPERS: dict[str, Callable[[Any], None]] = {
    "runners.batching": _wrap_batcher,
    "embed_http.clients": _wrap_protocol,
}


class _WrapOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        wrap = WRAPPERS.get(name)
        if wrap is None:
            return None
        sys.meta_path.remove(self)  # find the module's own spec, then watch for the other modules again
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        load = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            load(module)
            wrap(module)

        spec.loader.exec_module = exec_module
        return spec


if GATE:
    sys.meta_path.insert(0, _WrapOnImport())
