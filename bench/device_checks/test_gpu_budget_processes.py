"""The GPU memory budget between two real service processes on a GPU (runners/gpu_budget.py): the second load makes
the idle first one unload (its memory back to the driver), and a kill -9 of the second leaves the first able to
load again at once. Skipped without CUDA (the ledger's logic is tested on the CPU in tests/test_gpu_budget.py)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from tests.conftest import HANG_GUARD_SECONDS, REPO, build_qwen_tokenizer, qwen3_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# One service process: hold_runner as service.py holds it, its idle timer and budget watch running, and commands on
# stdin ("embed", "state") answered on stdout.
SERVICE = textwrap.dedent(
    """
    import asyncio, sys
    from runners.embedder import TextEmbedder
    from runners.idle import hold_runner
    from embed_core.table import SERVICES

    async def main():
        holder = hold_runner(SERVICES["qwen3_8b_embed"], TextEmbedder)
        print("loaded", flush=True)
        holder.start_idle_timer()
        while line := await asyncio.to_thread(sys.stdin.readline):
            if line.strip() == "embed":
                await holder.embed(["an orange cat"])
                print("answered", flush=True)
            else:
                print(holder.state, flush=True)

    asyncio.run(main())
    """
)


class Service:
    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVICE], cwd=REPO, env={**os.environ, **env},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def next_line(self) -> str:
        return self.lines.get(timeout=HANG_GUARD_SECONDS)  # a hang guard

    def ask(self, command: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.next_line()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(HANG_GUARD_SECONDS)


def test_a_second_load_unloads_the_idle_first_and_a_killed_service_holds_nothing(tmp_path: Path):
    from transformers import AutoTokenizer, Qwen3Model

    model_dir = tmp_path / "model"
    build_qwen_tokenizer(model_dir, appends_end_of_text=True)
    torch.manual_seed(0)
    Qwen3Model(qwen3_config(len(AutoTokenizer.from_pretrained(str(model_dir))))).save_pretrained(str(model_dir))
    # The 8B service's estimate is 9 GB: a 12 GB budget holds one, and the other's CUDA context.
    env = {
        "QWEN3_8B_EMBED_MODEL": str(model_dir),
        "EMBED_DEVICE": "cuda",
        "EMBED_COMPILE": "0",
        "EMBED_GPU_MEMORY": "12GB",
        "EMBED_GPU_BUDGET_DIR": str(tmp_path / "budget"),
        "QWEN3_8B_EMBED_IDLE_UNLOAD_SECONDS": "3600",
        "EMBED_WEIGHT_CACHE": "off",
    }
    first = Service(env)
    second = None
    try:
        assert first.next_line() == "loaded"
        second = Service(env)
        assert second.next_line() == "loaded"  # only once the first, idle, has unloaded
        assert first.ask("state") == "unloaded"
        second.kill()  # kill -9 with its reservation held
        assert first.ask("embed") == "answered"  # its entry is gone: the first loads at once
        assert first.ask("state") == "loaded"
    finally:
        for service in (first, second):
            if service is not None:
                service.kill()
