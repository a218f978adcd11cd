"""A test's hold on the model of a `bentoml serve` it started (tests/conftest.py puts this folder on PYTHONPATH, so
every Python process of that server runs it at start-up).

With EMBED_TEST_GATE=<path> set, runners.batching.Batcher is wrapped as it is imported:
- each `submit` (a request's items entering the queue) appends its item count to <path>.submitted, and to
  <path>.cancelled when its request is cancelled (its client left) while it waits;
- each round the model's thread takes appends its item count to <path>.rounds, then waits while the file
  <path> exists, before its forward pass.
So a test can close the gate, send requests, wait until the server has queued them (not until some time has
passed), open the gate, and read how the queue grouped them: no outcome depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import importlib.abc
import importlib.util
import os
import sys
import time
from typing import Any

GATE = os.environ.get("EMBED_TEST_GATE")


def _append(path: str, line: str) -> None:
    with open(path, "a") as record:
        record.write(line + "\n")


def _wrap(batching: Any) -> None:
    batcher = batching.Batcher
    original_init, original_submit = batcher.__init__, batcher.submit

    def __init__(self: Any, process: Any, *args: Any, **kwargs: Any) -> None:
        def gated(items: list[Any]) -> Any:
            _append(f"{GATE}.rounds", str(len(items)))
            while os.path.exists(GATE):
                time.sleep(0.005)
            return process(items)

        original_init(self, gated, *args, **kwargs)

    async def submit(self: Any, items: list[Any]) -> Any:
        # Recorded just before the items are queued, with no await between: the event loop (where the queue
        # takes its rounds) cannot take a round in between.
        _append(f"{GATE}.submitted", str(len(items)))
        try:
            return await original_submit(self, items)
        except asyncio.CancelledError:
            _append(f"{GATE}.cancelled", str(len(items)))
            raise

    batcher.__init__, batcher.submit = __init__, submit


class _WrapBatching(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "runners.batching":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            load(module)
            _wrap(module)

        spec.loader.exec_module = exec_module
        return spec


if GATE:
    sys.meta_path.insert(0, _WrapBatching())
