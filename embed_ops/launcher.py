"""What `start_embed_server.sh` asks Python: the plan, the wait for /health, status and stop.

The shell script only starts `bentoml serve` processes; everything it needs to know (classes,
ports, profiles, the memory estimate) and everything that decides whether a process is one it
started comes from here, so nothing is written down twice.

    python -m embed_ops.launcher usage  (start_embed_server.sh --help, its profiles from the table)
    python -m embed_ops.launcher plan   --run-dir D [--gpu-memory SIZE] [--profile NAME | SERVICE...]
    python -m embed_ops.launcher wait   --run-dir D --log-dir L --timeout S SERVICE...
    python -m embed_ops.launcher status --run-dir D --log-dir L
    python -m embed_ops.launcher stop   --run-dir D [SERVICE...]
    python -m embed_ops.launcher supervise --run-dir D --log-dir L SERVICE service:CLASS --port P [-- CMD...]
    python -m embed_ops.launcher watch  --run-dir D --log-dir L SERVICE...

A service the script started has a PID file `<run dir>/<seed name>.pid` holding "pid class port": the pid
of its supervisor (embed_ops/supervisor.py), which runs `bentoml serve` and restarts it when it dies. It is
ours only while that pid still runs the supervisor (or `bentoml serve`) for `service:<class> --port <port>`,
so a pid the system has reused for something else is never signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embed_core.table import SERVICES, spec_for

from . import supervisor
from .profiles import (
    DEFAULT_PROFILE,
    PROFILES,
    check_budget,
    describe_estimate,
    estimate_weights,
    free_gpu_memory,
    memory_warnings,
    per_gpu,
    profile_env,
    profile_for,
    service_port,
    total_gpu_memory,
)
from .sharing import shared_model_env

LOG_TAIL_LINES = 25
_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception)\b[^:]*: ")


def say(*lines: str) -> None:
    """Messages for the person at the terminal (stdout of plan is for the script)."""
    for line in lines:
        print(line, file=sys.stderr, flush=True)


# -- which processes are ours -----------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    seed_name: str
    pid: int
    class_name: str
    port: int


def pid_file(run_dir: Path, seed_name: str) -> Path:
    return run_dir / f"{seed_name}.pid"


def read_record(run_dir: Path, seed_name: str) -> Record | None:
    try:
        pid, class_name, port = pid_file(run_dir, seed_name).read_text().split()
        return Record(seed_name, int(pid), class_name, int(port))
    except (OSError, ValueError):
        return None


def records(run_dir: Path) -> list[Record]:
    """Every PID file in the run directory, in table order."""
    found = [read_record(run_dir, name) for name in SERVICES]
    return [record for record in found if record is not None]


def command_line(pid: int) -> str | None:
    """The command line of a live process; None once it is gone (a zombie has none)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode(errors="replace").strip() or None
    except FileNotFoundError:
        return None
    except OSError:
        pass
    try:  # no /proc (macOS)
        out = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def is_ours(record: Record) -> bool:
    """Is this pid still the supervisor (or, from an older run, the `bentoml serve`) the script started?"""
    line = command_line(record.pid)
    if line is None or "<defunct>" in line:
        return False
    words = line.split()
    serving = "serve" in words and "bentoml" in line
    supervising = "supervise" in words and "embed_ops.launcher" in words
    if not (serving or supervising) or f"service:{record.class_name}" not in words:
        return False
    try:
        return words[words.index("--port") + 1] == str(record.port)
    except (ValueError, IndexError):
        return False


def alive(pid: int) -> bool:
    """Does the process exist (zombies do not count)? Used while a service starts, when its command line
    may still be the shell's for an instant; `is_ours` is the check before anything is signalled."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (BentoML's workers run in process groups of their own)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_record(record: Record, grace: float) -> str:
    """SIGTERM `bentoml serve` (it stops its workers), SIGKILL it and its workers if they outlive `grace`."""
    if not is_ours(record):
        return f"{record.seed_name}: pid {record.pid} is not a service this script started (gone); nothing to stop"
    tree = [record.pid, *descendants(record.pid)]
    try:
        os.kill(record.pid, signal.SIGTERM)
    except ProcessLookupError:
        return f"{record.seed_name}: already gone"
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in tree):
            return f"stopped {record.seed_name} (pid {record.pid})"
        time.sleep(0.2)
    for pid in tree:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return f"killed {record.seed_name} (pid {record.pid}): it did not stop within {grace:.0f}s of SIGTERM"


# -- talking to a service ---------------------------------------------------------------------------


def get_health(port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as response:
            if response.status != 200:
                return None
            body = json.loads(response.read().decode())
            return body if isinstance(body, dict) else {}
    except (OSError, ValueError, urllib.error.URLError):
        return None


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def first_error(log_path: Path, offset: int = 0) -> str | None:
    """The first error line in a log after `offset` (usually the cause: later ones are its consequences)."""
    try:
        with open(log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    return next((line for line in text if _ERROR_LINE.match(line)), None)


def log_report(log_path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The first error in a log (usually the cause: later ones are its consequences), then the log's tail."""
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return [f"    (no log at {log_path})"]
    report = []
    cause = next((line for line in text if _ERROR_LINE.match(line)), None)
    if cause:
        report.append(f"    first error: {cause}")
    report.append(f"    last {min(lines, len(text))} lines of {log_path}:")
    report.extend(f"    | {line}" for line in text[-lines:])
    return report


def table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()

    return [line(header), line(["-" * width for width in widths]), *(line(row) for row in rows)]


SERVICE_HEADER = ["service", "port", "model", "device", "quantization", "URL"]


def service_row(seed_name: str, port: int, health: dict[str, Any]) -> list[str]:
    return [
        seed_name,
        str(port),
        str(health.get("model", "-")),
        str(health.get("device", "-")),
        str(health.get("quantization", "-")),
        f"http://localhost:{port}",
    ]


# -- the commands -----------------------------------------------------------------------------------


def chosen_services(profile_name: str | None, names: list[str]) -> tuple[str | None, list[str]]:
    if profile_name and names:
        raise SystemExit("give either --profile NAME or service names, not both")
    if names:
        unknown = [name for name in names if name not in SERVICES]
        if unknown:
            raise SystemExit(f"unknown service(s): {', '.join(unknown)}; known: {', '.join(SERVICES)}")
        return None, list(dict.fromkeys(names))
    profile_name = profile_name or os.environ.get("EMBED_PROFILE", "").strip() or DEFAULT_PROFILE
    if profile_name not in PROFILES:
        raise SystemExit(f"unknown profile {profile_name!r}; known: {', '.join(PROFILES)}")
    return profile_name, list(profile_for(profile_name).services)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print `env KEY VALUE` and `service NAME CLASS PORT STATE` lines (tab-separated) for the script."""
    profile_name, names = chosen_services(args.profile, args.services)
    profile = profile_for(profile_name) if profile_name else None
    env = profile_env(profile, os.environ)
    os.environ.update(env)  # what the services will see, for the estimate below
    if profile:
        say(f"profile {profile.name}: {profile.description}")
    for key, value in env.items():
        print(f"env\t{key}\t{value}")

    try:
        ports = {name: service_port(spec_for(name)) for name in names}
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    shared = shared_model_env(names, ports, os.environ)
    for name in names:
        spec = spec_for(name)
        if spec.model_host_env in shared:
            say(f"{name} runs on {spec.shares_model_with}'s copy of the model: its weights are loaded once")
            print(f"env\t{spec.model_host_env}\t{shared[spec.model_host_env]}")
    os.environ.update(shared)

    estimates = estimate_weights(names)
    totals = per_gpu(estimates)
    gpu_memory = budget_setting(args, profile, env)
    if totals and gpu_memory:
        try:
            notes, refusals = check_budget(names, gpu_memory, total_gpu_memory())
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        if refusals:
            say(*(f"REFUSED: {refusal}" for refusal in refusals))
            return 2
        say(*notes)
    elif totals:
        say(*describe_estimate(estimates))
        say(*(f"WARNING: {warning}" for warning in memory_warnings(totals, free_gpu_memory())))

    for name in names:
        spec, port = spec_for(name), ports[name]
        record = read_record(args.run_dir, name)
        if record is not None and is_ours(record):
            say(f"{name} is already running (pid {record.pid}, port {record.port}); leaving it as it is")
            print(f"service\t{name}\t{record.class_name}\t{record.port}\trunning")
            continue
        if record is not None:
            pid_file(args.run_dir, name).unlink(missing_ok=True)  # stale: its process is gone
        supervisor.state_file(args.run_dir, name).unlink(missing_ok=True)
        if port_in_use(port):
            say(f"FAILED {name}: port {port} is in use by a program this script did not start; not starting it")
            print(f"service\t{name}\t{spec.class_name}\t{port}\tbusy")
            continue
        print(f"service\t{name}\t{spec.class_name}\t{port}\tstart")
    return 0


def budget_setting(args: argparse.Namespace, profile: Any, env: dict[str, str]) -> str:
    """The GPU memory budget (--gpu-memory, else EMBED_GPU_MEMORY, else the profile's), exported to the services with
    the ledger's directory under the run directory; "" when there is none."""
    gpu_memory = args.gpu_memory or os.environ.get("EMBED_GPU_MEMORY", "").strip() or (profile and profile.gpu_memory)
    if not gpu_memory:
        return ""
    exported = {"EMBED_GPU_MEMORY": gpu_memory}
    if not os.environ.get("EMBED_GPU_BUDGET_DIR", "").strip():
        exported["EMBED_GPU_BUDGET_DIR"] = str((args.run_dir / "gpu-budget").resolve())
    for key, value in exported.items():
        if env.get(key) != value:
            print(f"env\t{key}\t{value}")
    os.environ.update(exported)
    return gpu_memory


def cmd_wait(args: argparse.Namespace) -> int:
    """Wait until every service answers /health or its process is gone; report both, then print the table."""
    pending = {name: read_record(args.run_dir, name) for name in args.services}
    healthy: dict[str, tuple[Record, dict[str, Any]]] = {}
    failed: dict[str, str] = {}
    for name, record in list(pending.items()):
        if record is None:
            failed[name] = "no PID file: it was not started"
            del pending[name]
    started_at = time.monotonic()
    next_note = started_at + 15
    while pending:
        for name, record in list(pending.items()):
            assert record is not None
            health = get_health(record.port)
            if health is not None:
                healthy[name] = (record, health)
                del pending[name]
            elif not alive(record.pid):
                failed[name] = supervisor.read_state(args.run_dir, name).get("message") or "its process exited"
                pid_file(args.run_dir, name).unlink(missing_ok=True)
                del pending[name]
        now = time.monotonic()
        if pending and now - started_at > args.timeout:
            break
        if pending and now >= next_note:
            print(f"  still loading after {now - started_at:.0f}s: {', '.join(pending)}", flush=True)
            next_note = now + 15
        if pending:
            time.sleep(0.5)

    for name, reason in failed.items():
        print(f"FAILED {name}: {reason}")
        print("\n".join(log_report(args.log_dir / f"{name}.log")))
    for name in pending:
        print(f"NOT READY {name}: no answer on /health after {args.timeout:.0f}s; it keeps loading")
        print(f"    follow it with: tail -f {args.log_dir / f'{name}.log'}")
    if healthy:
        rows = [service_row(name, record.port, health) for name, (record, health) in healthy.items()]
        print()
        print("\n".join(table(rows, SERVICE_HEADER)))
    return 0 if not failed and not pending else 1


def describe(record: Record, state: dict[str, Any], health: dict[str, Any] | None) -> str:
    """One service's state in words, from its supervisor's state file and /health."""
    if not is_ours(record):
        return str(state.get("state") or "exited") if state.get("state") in supervisor.FINAL_STATES else "exited"
    # /health answering is the truth: the supervisor records it only at its next poll.
    if health is not None:
        return "running"
    return "restarting" if state.get("state") == supervisor.RESTARTING else "starting (no /health yet)"


def cmd_status(args: argparse.Namespace) -> int:
    found = records(args.run_dir)
    if not found:
        print(f"no services started by start_embed_server.sh (no PID files in {args.run_dir})")
        return 1
    rows, reports = [], []
    all_up = True
    for record in found:
        state = supervisor.read_state(args.run_dir, record.seed_name)
        health = get_health(record.port) if is_ours(record) else None
        words = describe(record, state, health)
        all_up = all_up and words == "running"
        rows.append(
            [
                *service_row(record.seed_name, record.port, health or {}),
                words,
                str(record.pid),
                str(state.get("restarts", 0)),
                str(state.get("last_exit") or "-"),
            ]
        )
        if words != "running" and not words.startswith("starting"):
            reports.append(f"{record.seed_name}: {state.get('message') or words}")
            reports.extend(log_report(args.log_dir / f"{record.seed_name}.log"))
    print("\n".join(table(rows, [*SERVICE_HEADER, "state", "pid", "restarts", "last exit"])))
    if reports:
        print()
        print("\n".join(reports))
    return 0 if all_up else 1


def cmd_supervise(args: argparse.Namespace) -> int:
    """Run one service under a supervisor until it is stopped or gives up (see embed_ops/supervisor.py)."""
    command = args.command_line or [sys.executable, "-m", "bentoml", "serve", args.target, "--port", str(args.port)]
    return supervisor.Supervisor(
        seed_name=args.service,
        command=command,
        run_dir=args.run_dir,
        log_path=args.log_dir / f"{args.service}.log",
        healthy=lambda: get_health(args.port) is not None,
        policy=supervisor.RestartPolicy.from_env(os.environ),
        first_error=first_error,
    ).run()


def cmd_watch(args: argparse.Namespace) -> int:
    """The foreground run: say when a service dies, comes back or gives up; return once none is supervised."""
    seen: dict[str, tuple[Any, Any]] = {}
    for name in args.services:
        state = supervisor.read_state(args.run_dir, name)
        seen[name] = (state.get("state"), state.get("restarts"))
    while True:
        live = 0
        for name in args.services:
            record = read_record(args.run_dir, name)
            if record is None:
                continue
            ours = is_ours(record)
            live += ours
            state = supervisor.read_state(args.run_dir, name)
            now = (state.get("state"), state.get("restarts"))
            if now == seen.get(name) and ours:
                continue
            seen[name] = now
            if now[0] == supervisor.RESTARTING:
                print(f"{name} exited ({state.get('last_exit')}); {state.get('message')}", flush=True)
            elif now[0] == supervisor.RUNNING and now[1]:
                print(f"{name} is back after restart {now[1]}", flush=True)
            elif not ours and now != ("reported", None):
                seen[name] = ("reported", None)
                print(f"FAILED {name}: {state.get('message') or 'it exited'}")
                print("\n".join(log_report(args.log_dir / f"{name}.log")), flush=True)
        if not live:
            return 1
        time.sleep(args.poll)


def cmd_stop(args: argparse.Namespace) -> int:
    unknown = [name for name in args.services if name not in SERVICES]
    if unknown:
        raise SystemExit(f"unknown service(s): {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    chosen = [r for r in records(args.run_dir) if not args.services or r.seed_name in args.services]
    if not chosen:
        print("nothing to stop: no service started by start_embed_server.sh is recorded")
    for record in chosen:
        print(stop_record(record, args.grace), flush=True)
        pid_file(args.run_dir, record.seed_name).unlink(missing_ok=True)
        supervisor.state_file(args.run_dir, record.seed_name).unlink(missing_ok=True)
    return 0


USAGE = """\
Usage: ./start_embed_server.sh [start] [--profile NAME | SERVICE...] [--gpu-memory SIZE] [--detach]
       ./start_embed_server.sh status
       ./start_embed_server.sh stop [SERVICE...]

Starts the embedding and reranking services, each under a supervisor that runs `bentoml serve` and
restarts it when it dies, waits until every /health answers, and prints a table of them.

  (no argument)         the default profile: {default} (or $EMBED_PROFILE)
  --profile NAME        a profile (below)
  SERVICE...            the services named:
{services}
  --gpu-memory SIZE     a GPU memory budget for the services (24GiB, 22GB, or 0.9 of the card): refused if
                        they cannot fit even with every idle model unloaded; when one must load and the
                        budget is full, the least recently used idle one unloads first (README, "GPU budget")
  -d, --detach          start, wait for /health, return; the services keep running
  status                what the script started, and whether /health answers
  stop [SERVICE...]     stop what the script started (all, or those named)
  -h, --help            this text

Profiles:
{profiles}

Without --detach the script stays in the foreground, and Ctrl-C stops the services this run
started, and nothing else. Logs go to logs/<service>.log, PID files to .run/ (EMBED_LOG_DIR,
EMBED_RUN_DIR). README.md, "One-click start", has every setting."""


def usage_text() -> str:
    """start_embed_server.sh --help: every profile and service comes from the tables, none is written here."""
    width = max(map(len, PROFILES))
    profiles = [
        f"  {name:<{width}}  {', '.join(profile.services)}\n  {'':<{width}}  {profile.description}"
        for name, profile in PROFILES.items()
    ]
    services = textwrap.fill(", ".join(SERVICES), width=100, initial_indent=" " * 24, subsequent_indent=" " * 24)
    return USAGE.format(default=DEFAULT_PROFILE, services=services, profiles="\n".join(profiles))


def cmd_usage(args: argparse.Namespace) -> int:
    print(usage_text())
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embed_ops.launcher", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("usage", help="start_embed_server.sh --help")

    plan = commands.add_parser("plan", help="what to start (for start_embed_server.sh)")
    plan.add_argument("--profile", choices=list(PROFILES))
    plan.add_argument("--gpu-memory", default="", help="GPU memory budget: 24GiB, 22GB, or 0.9 (of the card)")
    plan.add_argument("services", nargs="*")

    wait = commands.add_parser("wait", help="wait for /health, report failures, print the table")
    wait.add_argument("--timeout", type=float, default=1800)
    wait.add_argument("services", nargs="+")

    status = commands.add_parser("status", help="the services the script started, and their state")
    status.add_argument("--log-dir", type=Path, default=Path("logs"))

    stop = commands.add_parser("stop", help="stop the services the script started (all, or those named)")
    stop.add_argument("--grace", type=float, default=30, help="seconds between SIGTERM and SIGKILL")
    stop.add_argument("services", nargs="*")

    supervise = commands.add_parser("supervise", help="run one service, restarting it when it dies")
    supervise.add_argument("--port", type=int, required=True)
    supervise.add_argument("service", choices=list(SERVICES))
    supervise.add_argument("target", help="service:<class>, what `bentoml serve` serves")

    watch = commands.add_parser("watch", help="report deaths, restarts and give-ups until no service is left")
    watch.add_argument("--poll", type=float, default=1.0)
    watch.add_argument("services", nargs="+")

    for sub in (plan, wait, status, stop, supervise, watch):
        sub.add_argument("--run-dir", type=Path, required=True)
    for sub in (wait, supervise, watch):
        sub.add_argument("--log-dir", type=Path, required=True)

    words = list(argv) if argv is not None else sys.argv[1:]
    # After `--`: the command `supervise` runs instead of `bentoml serve` (a stand-in service, in tests).
    command_line = words[words.index("--") + 1 :] if "--" in words else []
    args = parser.parse_args(words[: words.index("--")] if "--" in words else words)
    args.command_line = command_line
    handlers = {
        "usage": cmd_usage,
        "plan": cmd_plan,
        "wait": cmd_wait,
        "status": cmd_status,
        "stop": cmd_stop,
        "supervise": cmd_supervise,
        "watch": cmd_watch,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        # Die of SIGINT, so that the calling shell sees a Ctrl-C and runs its trap.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130


if __name__ == "__main__":
    sys.exit(main())
