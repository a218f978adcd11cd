"""Supervision for the one-click start: one supervisor process per service keeps its `bentoml serve` running.

`bentoml serve` exits as a whole when its worker dies (the OOM killer, a CUDA fault, a native crash), and
the start script sets BENTOML_CONTAINERIZED so that BentoML itself never respawns a worker whose model
cannot load. The supervisor restarts the whole `bentoml serve` instead, with a growing pause, and gives up,
saying why, on a crash loop or when a start never reaches /health (a model that fails its start-up check
does not get better by retrying). A SIGTERM (`stop`, Ctrl-C) stops the service and is never "restarted".

What it did is kept in `<run dir>/<seed name>.state.json` for `status` and the foreground output.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embed_core.config import SettingError, environ_number

# States a state file holds. The first three are a live supervisor's; the last three are final.
STARTING, RUNNING, RESTARTING = "starting", "running", "restarting"
CRASH_LOOP, START_FAILED, STOPPED = "crash loop", "start failed", "stopped"
FINAL_STATES = (CRASH_LOOP, START_FAILED, STOPPED)


def env_seconds(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    try:
        return environ_number(env, name, default, parse=float, minimum=minimum)
    except SettingError as exc:
        raise SystemExit(str(exc)) from None


@dataclass(frozen=True)
class RestartPolicy:
    """Restart after 1 s, 2 s, 4 s ... (at most `max_delay`); `limit` crashes within `window` seconds is a loop."""

    limit: int = 5
    window: float = 600.0
    first_delay: float = 1.0
    max_delay: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RestartPolicy:
        return cls(
            limit=int(env_seconds(env, "EMBED_RESTART_LIMIT", cls.limit, minimum=1)),
            window=env_seconds(env, "EMBED_RESTART_WINDOW", cls.window, minimum=1),
            max_delay=env_seconds(env, "EMBED_RESTART_MAX_DELAY", cls.max_delay, minimum=cls.first_delay),
        )

    def recent(self, crashes: list[float], now: float) -> int:
        return sum(1 for when in crashes if now - when <= self.window)

    def is_loop(self, crashes: list[float], now: float) -> bool:
        return self.recent(crashes, now) >= self.limit

    def delay(self, crashes: list[float], now: float) -> float:
        """The pause before the next start: doubles with each crash still inside the window."""
        return min(self.max_delay, self.first_delay * 2 ** max(0, self.recent(crashes, now) - 1))


def state_file(run_dir: Path, seed_name: str) -> Path:
    return run_dir / f"{seed_name}.state.json"


def read_state(run_dir: Path, seed_name: str) -> dict[str, Any]:
    try:
        state = json.loads(state_file(run_dir, seed_name).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def exit_reason(returncode: int, first_error: str | None) -> str:
    if returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exit status {returncode}"
    return f"{how}: {first_error}" if first_error else how


@dataclass
class Supervisor:
    seed_name: str
    command: list[str]
    run_dir: Path
    log_path: Path
    healthy: Callable[[], bool]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    first_error: Callable[[Path, int], str | None] = lambda path, offset: None
    poll: float = 0.5
    state: dict[str, Any] = field(default_factory=dict)
    stopping: bool = False
    child: subprocess.Popen | None = None

    def write(self, **changes: Any) -> None:
        self.state.update(changes, updated=time.time())
        path = state_file(self.run_dir, self.seed_name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(path)  # whole or not at all, for a reader polling it

    def log(self, line: str) -> None:
        """A line of our own in the service's log, so that the log tells the whole story."""
        with contextlib.suppress(OSError), open(self.log_path, "a") as log:
            log.write(f"[supervisor {time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")

    def on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signal.SIGTERM)  # bentoml serve drains and stops its workers

    def sleep(self, seconds: float) -> None:
        """A pause a stop interrupts."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(self.poll, max(0.0, deadline - time.monotonic())))

    def run_once(self) -> tuple[int, bool, int]:
        """Start the service, wait for it to end; (its return code, whether /health ever answered, log offset)."""
        try:
            offset = self.log_path.stat().st_size
        except OSError:
            offset = 0
        with open(self.log_path, "ab") as log:
            self.child = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.write(service_pid=self.child.pid, state=STARTING if not self.state.get("restarts") else RESTARTING)
        ever_healthy = False
        while (code := self.child.poll()) is None:
            if not ever_healthy and not self.stopping and self.healthy():
                ever_healthy = True
                self.write(state=RUNNING, healthy_since=time.time(), message=None)
                if self.state.get("restarts"):
                    self.log(f"{self.seed_name} is back (restart {self.state['restarts']})")
            time.sleep(self.poll)
        return code, ever_healthy, offset

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.on_signal)
        self.write(supervisor_pid=os.getpid(), state=STARTING, restarts=0, last_exit=None, message=None)
        crashes: list[float] = []
        while True:
            code, ever_healthy, offset = self.run_once()
            if self.stopping:
                self.write(state=STOPPED, service_pid=None, message="stopped on request")
                return 0
            now = time.time()
            reason = exit_reason(code, self.first_error(self.log_path, offset))
            self.write(last_exit=reason, last_exit_at=now, service_pid=None)
            # A first start that never answers is a cause to fix (a model that cannot load); a restart of a service
            # that was up may fail for a passing reason (circus gives up on a worker slow to spawn on a loaded
            # machine), so it counts as a crash, under the crash-loop limit.
            if not ever_healthy and not self.state.get("restarts"):
                message = f"it exited before /health answered ({reason}); not restarting: fix the cause, then start it"
                self.log(message)
                self.write(state=START_FAILED, message=message)
                return 1
            crashes.append(now)
            if self.policy.is_loop(crashes, now):
                message = (
                    f"crash loop: {self.policy.recent(crashes, now)} crashes within {self.policy.window:.0f}s "
                    f"(last: {reason}); not restarting"
                )
                self.log(message)
                self.write(state=CRASH_LOOP, message=message)
                return 1
            delay = self.policy.delay(crashes, now)
            restarts = self.state.get("restarts", 0) + 1
            self.log(f"{self.seed_name} exited ({reason}); restart {restarts} in {delay:.0f}s")
            self.write(state=RESTARTING, restarts=restarts, message=f"restart {restarts} in {delay:.0f}s")
            self.sleep(delay)
            if self.stopping:
                self.write(state=STOPPED, message="stopped on request")
                return 0
