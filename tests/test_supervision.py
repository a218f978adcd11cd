"""The one-click start's supervisor (embed_ops/supervisor.py): the restart policy, and the supervisor itself
running a stand-in service (a small HTTP server written here) so that crashes, a crash loop, a start that
fails and a deliberate stop take seconds. tests/test_start_script.py kills a real `bentoml serve` worker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from embed_ops.supervisor import RestartPolicy
from tests.conftest import HANG_GUARD_SECONDS, REPO, free_port

FAKE_SERVICE = textwrap.dedent(
    """
    import http.server, os, signal, sys, threading
    port, mode, starts = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    with open(starts, "a") as out:
        out.write(f"{os.getpid()}\\n")
    started = len(open(starts).read().split())
    if mode == "broken" or (mode == "restart-fails-once" and started == 2):
        print("ValueError: BGE_EMBED_MODEL='/nowhere' is not a model", flush=True)
        sys.exit(2)

    answered = threading.Event()
    crashes = mode == "crash" or (mode == "restart-fails-once" and started == 1)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            if crashes and not answered.is_set():
                answered.set()  # crashes once it has been seen up: a crash of a running service, on any machine
                threading.Timer(0.1, crash).start()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Health)

    def crash():
        print("RuntimeError: the worker died", flush=True)
        os._exit(3)

    def terminated(signum, frame):
        print("got SIGTERM", flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, terminated)
    server.serve_forever()
    """
)


def test_the_pause_doubles_up_to_the_cap_and_five_crashes_in_ten_minutes_are_a_loop():
    policy = RestartPolicy()
    crashes: list[float] = []
    delays, loops = [], []
    for minute in range(5):
        crashes.append(60.0 * minute)
        delays.append(policy.delay(crashes, 60.0 * minute))
        loops.append(policy.is_loop(crashes, 60.0 * minute))
    assert delays == [1, 2, 4, 8, 16]
    assert loops == [False, False, False, False, True]
    # Crashes older than the window are forgiven: the pause starts again at 1 s.
    assert policy.delay(crashes, 60.0 * 4 + 601 + 240) == 1
    assert not policy.is_loop(crashes, 60.0 * 4 + 601)
    # The pause never exceeds a minute, however many crashes the limit allows.
    patient = RestartPolicy(limit=100)
    assert [patient.delay([0.0] * n, 0.0) for n in (6, 7, 8, 50)] == [32, 60, 60, 60]


def test_bad_restart_settings_are_refused():
    with pytest.raises(SystemExit, match="EMBED_RESTART_LIMIT"):
        RestartPolicy.from_env({"EMBED_RESTART_LIMIT": "0"})
    with pytest.raises(SystemExit, match="EMBED_RESTART_WINDOW"):
        RestartPolicy.from_env({"EMBED_RESTART_WINDOW": "ten"})
    assert RestartPolicy.from_env({"EMBED_RESTART_LIMIT": "3"}).limit == 3


def test_status_believes_health_over_a_state_file_the_supervisor_has_not_updated_yet(monkeypatch):
    from embed_ops import launcher, supervisor

    record = launcher.Record("bge_embed", os.getpid(), "BgeEmbed", 6013)
    monkeypatch.setattr(launcher, "is_ours", lambda record: True)
    # Between a restarted service's first /health and the supervisor's next poll the file still says restarting.
    restarting = {"state": supervisor.RESTARTING, "restarts": 1}
    assert launcher.describe(record, restarting, {"status": "ok"}) == "running"
    assert launcher.describe(record, restarting, None) == "restarting"
    assert launcher.describe(record, {"state": supervisor.STARTING}, None).startswith("starting")


class Supervised:
    """`python -m embed_ops.launcher supervise` running the stand-in service; its PID file as the script writes it."""

    def __init__(self, tmp_path: Path, mode: str, **env: str) -> None:
        self.port = free_port()
        self.run_dir, self.log_dir = tmp_path / "run", tmp_path / "logs"
        self.run_dir.mkdir()
        self.log_dir.mkdir()
        self.starts = tmp_path / "starts"
        fake = tmp_path / "fake_service.py"
        fake.write_text(FAKE_SERVICE)
        self.dirs = ["--run-dir", str(self.run_dir), "--log-dir", str(self.log_dir)]
        command = [sys.executable, "-m", "embed_ops.launcher", "supervise", *self.dirs]
        command += ["bge_embed", "service:BgeEmbed", "--port", str(self.port)]
        command += ["--", sys.executable, str(fake), str(self.port), mode, str(self.starts)]
        with open(self.log_dir / "bge_embed.log", "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        (self.run_dir / "bge_embed.pid").write_text(f"{self.process.pid} BgeEmbed {self.port}\n")

    def launcher(self, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "embed_ops.launcher", *args]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)

    def state(self) -> dict:
        try:
            return json.loads((self.run_dir / "bge_embed.state.json").read_text())
        except (OSError, ValueError):
            return {}

    def service_pids(self) -> list[int]:
        return [int(line) for line in self.starts.read_text().split()] if self.starts.exists() else []

    def wait_for(self, condition, timeout: float = HANG_GUARD_SECONDS) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.2)
        return False

    def log(self) -> str:
        return (self.log_dir / "bge_embed.log").read_text()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=HANG_GUARD_SECONDS)
        for pid in self.service_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_killed_service_is_restarted_and_status_says_so(tmp_path):
    supervised = Supervised(tmp_path, "serve")
    try:
        assert supervised.wait_for(lambda: supervised.state().get("state") == "running")
        [first] = supervised.service_pids()
        os.kill(first, signal.SIGKILL)
        assert supervised.wait_for(lambda: supervised.state().get("restarts") == 1 and healthy(supervised.port))
        assert supervised.wait_for(lambda: supervised.state().get("state") == "running")
        assert len(supervised.service_pids()) == 2
        status = supervised.launcher("status", *supervised.dirs)
        [row] = [line for line in status.stdout.splitlines() if line.startswith("bge_embed ")]
        assert row.endswith(" killed by SIGKILL"), status.stdout  # the last exit
        words = row.split()
        assert words[words.index("running") + 1 : words.index("running") + 3] == [str(supervised.process.pid), "1"]
        assert "restart 1 in 1s" in supervised.log() and "is back (restart 1)" in supervised.log()

        # A deliberate stop: SIGTERM reaches the service, which is not started again.
        stopped = supervised.launcher("stop", "--run-dir", str(supervised.run_dir))
        assert "stopped bge_embed" in stopped.stdout, stopped.stdout + stopped.stderr
        assert supervised.process.wait(timeout=HANG_GUARD_SECONDS) == 0
        assert "got SIGTERM" in supervised.log()
        time.sleep(1.5)  # longer than the first restart pause
        assert len(supervised.service_pids()) == 2 and not healthy(supervised.port)
        assert list(supervised.run_dir.glob("bge_embed.*")) == []
    finally:
        supervised.close()


def test_a_crash_loop_stops_the_restarts_and_is_reported_with_the_log(tmp_path):
    supervised = Supervised(tmp_path, "crash", EMBED_RESTART_LIMIT="3")
    try:
        assert supervised.process.wait(timeout=HANG_GUARD_SECONDS) == 1
        state = supervised.state()
        assert state["state"] == "crash loop" and state["restarts"] == 2
        assert len(supervised.service_pids()) == 3  # started, restarted twice, then given up
        assert state["last_exit"] == "exit status 3: RuntimeError: the worker died"
        assert "crash loop: 3 crashes within 600s" in state["message"]
        assert "restart 1 in 1s" in supervised.log() and "restart 2 in 2s" in supervised.log()

        status = supervised.launcher("status", *supervised.dirs)
        assert status.returncode == 1
        [row] = [line for line in status.stdout.splitlines() if line.startswith("bge_embed ")]
        assert " crash loop " in row
        assert "bge_embed: crash loop: 3 crashes" in status.stdout
        assert "| RuntimeError: the worker died" in status.stdout  # the log's tail
    finally:
        supervised.close()


def test_a_service_that_never_reaches_health_is_not_restarted(tmp_path):
    supervised = Supervised(tmp_path, "broken")
    try:
        assert supervised.process.wait(timeout=HANG_GUARD_SECONDS) == 1
        time.sleep(1.5)
        assert len(supervised.service_pids()) == 1
        state = supervised.state()
        assert state["state"] == "start failed"
        assert "exited before /health answered (exit status 2: ValueError: BGE_EMBED_MODEL=" in state["message"]
        watched = supervised.launcher("watch", *supervised.dirs, "bge_embed")
        assert watched.returncode == 1
        assert "FAILED bge_embed: it exited before /health answered" in watched.stdout
        assert "first error: ValueError: BGE_EMBED_MODEL='/nowhere' is not a model" in watched.stdout
    finally:
        supervised.close()


def test_a_restart_that_fails_before_health_is_tried_again(tmp_path):
    """Up, crashed, and its first restart exits before /health answers (as `bentoml serve` does when circus gives up
    on a worker slow to spawn): that restart counts as a crash, and the next one brings the service back."""
    supervised = Supervised(tmp_path, "restart-fails-once")
    try:
        assert supervised.wait_for(lambda: len(supervised.service_pids()) == 3 and healthy(supervised.port))
        assert supervised.wait_for(lambda: supervised.state().get("state") == "running")
        assert supervised.state()["restarts"] == 2
        assert "restart 1 in 1s" in supervised.log() and "restart 2 in 2s" in supervised.log()
    finally:
        supervised.close()
