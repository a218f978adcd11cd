"""Soak: a long, bounded stream of mixed requests at a text-embedding service on 127.0.0.1, watching the
server's memory, open files and threads between phases (they should stay flat after the warm-up).

    python bench/soak.py                                  # starts its own BgeEmbed on the demo model
    python bench/soak.py --phases 20 --per-phase 2500     # the long run in BENCHMARKS.md
    python bench/soak.py --url http://127.0.0.1:6012      # a service already running (no process figures)

Each phase sends `--per-phase` requests from `--clients` concurrent clients, drawn with a fixed seed from a
mix: one text of any length (1 to 600 words, CJK too), a batch of 2-16 texts, bad inputs (blank text,
wrong types, broken JSON, an empty batch: each must get a 4xx), and cancelled clients (the request is sent,
the client hangs up before the answer). After each phase: the worker's RSS, open file descriptors and threads
(from /proc, summed over `bentoml serve` and its workers), and p50/p99 of the answered requests.
tests/test_slow_clients.py runs a short version and checks that the figures stay flat.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "rain",
    "fell",
    "over",
    "quiet",
    "hills",
    "and",
    "猫",
    "在",
    "垫子",
    "上",
    "睡觉",
    "雨",
    "落在",
    "安静",
    "的",
    "山丘",
]


@dataclass
class Phase:
    index: int
    requests: int
    seconds: float
    statuses: Counter
    p50_ms: float
    p99_ms: float
    rss_mib: float | None
    fds: int | None
    threads: int | None
    unexpected: list[str] = field(default_factory=list)


def text(rng: random.Random) -> str:
    """Mostly short texts, as a search box or a caption sends; now and then one past the model's 256 tokens."""
    length = rng.choice([1, 2, 5, 10, 20, 40, 80]) if rng.random() < 0.95 else rng.randint(200, 600)
    return " ".join(rng.choice(WORDS) for _ in range(length))


# name, weight, build(rng) -> (path, body bytes, the statuses that are right)
def _one(rng: random.Random) -> tuple[str, bytes, set[int]]:
    return "/embed/text", json.dumps({"text": text(rng)}).encode(), {200}


def _batch(rng: random.Random) -> tuple[str, bytes, set[int]]:
    return "/embed/texts", json.dumps({"texts": [text(rng) for _ in range(rng.randint(2, 16))]}).encode(), {200}


def _bad(rng: random.Random) -> tuple[str, bytes, set[int]]:
    body = rng.choice(
        [b'{"text": "   "}', b'{"text": 5}', b'{"text": "a"', b'{"texts": []}', b'{"texts": "a"}', b'{"txt": "a"}']
    )
    return rng.choice(["/embed/text", "/embed/texts"]), body, {400, 422}


MIX: list[tuple[str, float, Callable[[random.Random], tuple[str, bytes, set[int]]]]] = [
    ("one", 0.6, _one),
    ("batch", 0.2, _batch),
    ("bad", 0.12, _bad),
    ("cancelled", 0.08, _one),
]


def cancelled_request(host: str, port: int, path: str, body: bytes) -> None:
    """Send a whole request, then hang up before the answer (a client that timed out or was killed)."""
    with socket.create_connection((host, port), timeout=10) as sock:
        head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        sock.sendall(head.encode() + f"content-length: {len(body)}\r\n\r\n".encode() + body)


def process_figures(pids: list[int]) -> tuple[float | None, int | None, int | None]:
    """RSS (MiB), open fds and threads summed over the given processes, from /proc."""
    if not pids:
        return None, None, None
    rss = fds = threads = 0
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss += int(fields["VmRSS"].split()[0])
        threads += int(fields["Threads"])
        fds += len(os.listdir(f"/proc/{pid}/fd"))
    return rss / 1024, fds, threads


def settled_figures(pids: Callable[[], list[int]], limit: float = 120.0) -> tuple[float | None, ...]:
    """process_figures once the server's files and threads stop changing (three equal reads 0.2 s apart): the
    handlers of cancelled requests and the connections just closed are done with, however busy the machine."""
    reads = [process_figures(pids())]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and (len(reads) < 3 or len({figures[1:] for figures in reads[-3:]}) > 1):
        time.sleep(0.2)
        reads.append(process_figures(pids()))
    return reads[-1]


def server_pids(root: int) -> list[int]:
    """`bentoml serve` and every process below it."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, todo = [root], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_phase(url: str, index: int, count: int, clients: int, seed: int, pids: Callable[[], list[int]]) -> Phase:
    rng = random.Random(seed * 1000 + index)
    plan = [rng.choices(MIX, weights=[weight for _, weight, _ in MIX])[0] for _ in range(count)]
    jobs = [(name, *build(rng)) for name, _, build in plan]
    host, port = url.split("//")[1].split(":")
    statuses: Counter = Counter()
    unexpected: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    local = threading.local()
    opened: list[httpx.Client] = []

    def send(job: tuple[str, str, bytes, set[int]]) -> None:
        name, path, body, expected = job
        if name == "cancelled":
            cancelled_request(host, int(port), path, body)
            with lock:
                statuses["cancelled"] += 1
            return
        if not hasattr(local, "client"):
            # keepalive_expiry under uvicorn's 5 s: never a request on a connection the server is just closing.
            local.client = httpx.Client(
                base_url=url,
                timeout=120,
                headers={"content-type": "application/json"},
                limits=httpx.Limits(keepalive_expiry=2),
            )
            with lock:
                opened.append(local.client)
        started = time.perf_counter()
        try:
            answer = local.client.post(path, content=body)
        except httpx.HTTPError as exc:
            with lock:
                statuses[type(exc).__name__] += 1
                unexpected.append(f"{name} {path}: {type(exc).__name__}")
            return
        elapsed = time.perf_counter() - started
        with lock:
            statuses[answer.status_code] += 1
            if answer.status_code == 200:
                latencies.append(elapsed)
            if answer.status_code not in expected:
                unexpected.append(f"{name} {path} {body[:60]!r}: {answer.status_code} {answer.text[:200]}")

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, jobs))
    seconds = time.perf_counter() - started
    for client in opened:  # their keep-alive connections would still count among the server's files
        client.close()
    rss, fds, threads = settled_figures(pids)
    latencies.sort()
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else float("nan")
    return Phase(index, count, seconds, statuses, p50, p99, rss, fds, threads, unexpected)


def start_demo_service(log_dir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "BGE_EMBED_MODEL": "demo",
        "EMBED_DEVICE": "cpu",
        "BENTOML_DO_NOT_TRACK": "true",
        "BENTOML_HOME": str(log_dir / "bentoml-home"),
    }
    command = [sys.executable, "-m", "bentoml", "serve", "service:BgeEmbed", "--port", str(port), "--host", "127.0.0.1"]
    with open(log_dir / "soak-server.log", "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the service exited; see {log_dir / 'soak-server.log'}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit("the service did not answer /health within 300 s")


def soak(url: str, phases: int, per_phase: int, clients: int, seed: int, pids: Callable[[], list[int]]) -> list[Phase]:
    """Phase 0 is the warm-up; the figures after it are the baseline."""
    results = []
    for index in range(phases):
        phase = run_phase(url, index, per_phase, clients, seed, pids)
        results.append(phase)
        yield_line(phase)
    return results


def yield_line(phase: Phase) -> None:
    counts = " ".join(f"{key}={value}" for key, value in sorted(phase.statuses.items(), key=str))
    figures = (
        f"rss {phase.rss_mib:.1f} MiB, fds {phase.fds}, threads {phase.threads}"
        if phase.rss_mib is not None
        else "no process figures"
    )
    print(
        f"phase {phase.index:2d}: {phase.requests} requests in {phase.seconds:.1f}s, "
        f"p50 {phase.p50_ms:.0f} ms, p99 {phase.p99_ms:.0f} ms, {figures}; {counts}",
        flush=True,
    )
    for line in phase.unexpected[:5]:
        print(f"    unexpected: {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running service (default: start BgeEmbed on the demo model)")
    parser.add_argument("--phases", type=int, default=10)
    parser.add_argument("--per-phase", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the phases here")
    args = parser.parse_args(argv)
    if not 1 <= args.phases <= 1000 or not 1 <= args.per_phase <= 100_000:
        raise SystemExit("--phases 1..1000, --per-phase 1..100000: the soak is bounded")
    process = None
    # A SIGTERM (a timeout, a Ctrl-C elsewhere) still stops the service this run started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            url, pids = args.url.rstrip("/"), list
        else:
            process, url = start_demo_service(Path(tmp))
            root = process.pid
            pids = lambda: server_pids(root)  # noqa: E731
        try:
            results = soak(url, args.phases, args.per_phase, args.clients, args.seed, pids)
            health = httpx.get(f"{url}/health", timeout=10)
            print(f"after the soak: /health {health.status_code} {health.json().get('texts_embedded')} texts embedded")
        finally:
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    print("the service did not stop within 60 s of SIGTERM; killed", flush=True)
                    for pid in server_pids(process.pid):  # its worker too (a process group of its own)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
    if args.json:
        args.json.write_text(json.dumps([{**vars(p), "statuses": dict(p.statuses)} for p in results], default=str))
    return 1 if any(p.unexpected for p in results) else 0


if __name__ == "__main__":
    sys.exit(main())
