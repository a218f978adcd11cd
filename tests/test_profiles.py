"""Profiles, the GPU-memory estimate, and the launcher's plan/stop/status (no model is loaded here)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embed_core.table import SERVICES
from embed_ops import launcher
from embed_ops.profiles import PROFILES, estimate_weights, memory_warnings, per_gpu, profile_env
from tests.conftest import HANG_GUARD_SECONDS

REPO = Path(__file__).resolve().parent.parent

# The seed's VRAM table ("显存需求"), GB per model: FP16 and INT8 columns.
SEED_VRAM = {
    ("qwen3_8b_embed", "none"): 16,
    ("qwen3_8b_embed", "int8"): 8,
    ("qwen3_8b_rerank", "none"): 16,
    ("qwen3_8b_rerank", "int8"): 8,
    ("qwen3_4b_embed", "none"): 8,
    ("qwen3_4b_embed", "int8"): 4,
    ("qwen3_4b_rerank", "none"): 8,
    ("qwen3_4b_rerank", "int8"): 4,
}
# The seed's "24GB 显存推荐配置": profile -> (text services, total GB)
SEED_PROFILES = {
    "high": ({"qwen3_8b_embed", "qwen3_8b_rerank"}, 16),
    "balanced": ({"qwen3_8b_embed", "qwen3_4b_rerank"}, 12),
    "light": ({"qwen3_4b_embed", "qwen3_4b_rerank"}, 16),
}
QUANT_VARS = [spec.quantization_env for spec in SERVICES.values()] + ["EMBED_QUANTIZATION", "EMBED_DEVICE"]


@pytest.fixture
def clean_env(monkeypatch):
    for name in QUANT_VARS + [f"{spec.env_prefix}_DEVICE" for spec in SERVICES.values()]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def apply(monkeypatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_profiles_name_only_table_services_and_gpu_profiles_carry_siglip2():
    for profile in PROFILES.values():
        assert set(profile.services) <= set(SERVICES), profile.name
        if profile.uses_gpu:
            assert "siglip2_embed" in profile.services, profile.name  # an image library always embeds images
    assert set(PROFILES["all"].services) == set(SERVICES)


@pytest.mark.parametrize("name", sorted(SEED_PROFILES))
def test_seed_profiles_match_the_seed_table(clean_env, name):
    text_services, seed_total = SEED_PROFILES[name]
    profile = PROFILES[name]
    assert set(profile.services) - {"siglip2_embed"} == text_services
    apply(clean_env, profile_env(profile, os.environ))
    estimates = {e.seed_name: e for e in estimate_weights(list(profile.services))}
    for seed_name in text_services:
        e = estimates[seed_name]
        assert e.gigabytes == pytest.approx(SEED_VRAM[(seed_name, e.quantization)]), seed_name
    assert sum(estimates[s].gigabytes for s in text_services) == pytest.approx(seed_total)
    # SigLIP2: 1.14 B parameters in bf16.
    assert estimates["siglip2_embed"].gigabytes == pytest.approx(1.14 * 2)
    assert per_gpu(list(estimates.values())) == {"0": pytest.approx(seed_total + 2.28)}


def test_the_users_quantization_beats_the_profiles(clean_env):
    clean_env.setenv("QWEN3_4B_RERANK_QUANTIZATION", "none")
    env = profile_env(PROFILES["balanced"], os.environ)
    assert "QWEN3_4B_RERANK_QUANTIZATION" not in env
    assert env["QWEN3_8B_EMBED_QUANTIZATION"] == "int8"
    apply(clean_env, env)
    [rerank] = estimate_weights(["qwen3_4b_rerank"])
    assert (rerank.quantization, rerank.gigabytes) == ("none", pytest.approx(8.0))


def test_demo_profile_forces_the_bundled_weights_on_cpu(clean_env):
    clean_env.setenv("BGE_EMBED_MODEL", "/somewhere/else")
    env = profile_env(PROFILES["demo"], os.environ)
    assert env == {"BGE_EMBED_MODEL": "demo", "BGE_EMBED_DEVICE": "cpu"}
    apply(clean_env, env)
    assert per_gpu(estimate_weights(["bge_embed"])) == {}  # nothing on a GPU: no memory check


def test_estimate_is_per_gpu(clean_env):
    clean_env.setenv("QWEN3_8B_RERANK_DEVICE", "cuda:1")
    clean_env.setenv("SIGLIP2_EMBED_DEVICE", "cpu")
    clean_env.setenv("QWEN3_8B_EMBED_QUANTIZATION", "nf4")
    totals = per_gpu(estimate_weights(["siglip2_embed", "qwen3_8b_embed", "qwen3_8b_rerank"]))
    assert totals == {"0": pytest.approx(4.0), "1": pytest.approx(8.0)}


def test_memory_warning_only_when_the_estimate_exceeds_free_memory():
    totals = {"0": 18.3, "1": 8.0}
    warnings = memory_warnings(totals, {"0": int(16e9), "1": int(20e9)})
    assert len(warnings) == 1 and warnings[0].startswith("GPU 0") and "18.3 GB" in warnings[0]
    assert memory_warnings(totals, {}) == []  # CPU-only: nothing to compare with, nothing said


def fake_nvidia_smi(tmp_path: Path, free_mib: list[int]) -> str:
    """A PATH whose nvidia-smi reports these free MiB per physical GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    lines = "\\n".join(f"{i}, {mib}" for i, mib in enumerate(free_mib))
    script = bin_dir / "nvidia-smi"
    script.write_text(f'#!/bin/sh\nprintf "{lines}\\n"\n')
    script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_free_memory_follows_cuda_visible_devices(tmp_path, monkeypatch):
    from embed_ops.profiles import free_gpu_memory

    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, [20000, 5000]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert free_gpu_memory() == {"0": 20000 * 2**20, "1": 5000 * 2**20}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert free_gpu_memory() == {"0": 5000 * 2**20}  # torch's cuda:0 is physical GPU 1


def run_launcher(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "embed_ops.launcher", *args], cwd=REPO, env=full_env, capture_output=True, text=True
    )


def parse_plan(stdout: str) -> tuple[dict[str, str], dict[str, tuple[str, int, str]]]:
    env, services = {}, {}
    for line in stdout.splitlines():
        kind, *fields = line.split("\t")
        if kind == "env":
            env[fields[0]] = fields[1]
        else:
            assert kind == "service", line
            services[fields[0]] = (fields[1], int(fields[2]), fields[3])
    return env, services


def test_plan_gives_the_script_the_tables_classes_and_ports_and_warns_about_memory(tmp_path):
    clean = {name: "" for name in QUANT_VARS}
    result = run_launcher(
        "plan", "--profile", "balanced", "--run-dir", str(tmp_path / "run"),
        env={**clean, "PATH": fake_nvidia_smi(tmp_path, [10000])},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    env, services = parse_plan(result.stdout)
    assert env == {"QWEN3_8B_EMBED_QUANTIZATION": "int8", "QWEN3_4B_RERANK_QUANTIZATION": "int8"}
    assert list(services) == list(PROFILES["balanced"].services)
    for name, (class_name, port, state) in services.items():
        assert (class_name, port) == (SERVICES[name].class_name, SERVICES[name].port)
        assert state in ("start", "busy")
    # 2.28 + 8 + 4 = 14.3 GB of weights against 10000 MiB (10.5 GB) free.
    assert "GPU 0: ~14.3 GB" in result.stderr and "WARNING: GPU 0" in result.stderr


def test_plan_rejects_unknown_names_and_mixing_a_profile_with_names(tmp_path):
    run_dir = str(tmp_path / "run")
    unknown = run_launcher("plan", "--run-dir", run_dir, "qwen3_9b_embed")
    assert unknown.returncode != 0 and "unknown service" in unknown.stderr and unknown.stdout == ""
    mixed = run_launcher("plan", "--run-dir", run_dir, "--profile", "light", "bge_embed")
    assert mixed.returncode != 0 and "not both" in mixed.stderr
    bad_profile = run_launcher("plan", "--run-dir", run_dir, "--profile", "huge")
    assert bad_profile.returncode != 0 and "huge" in bad_profile.stderr


def test_plan_does_not_start_a_service_whose_port_is_taken(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = run_launcher(
            "plan", "--run-dir", str(tmp_path), "bge_embed", "qwen3_8b_embed", env={"BGE_EMBED_PORT": str(port)}
        )
    assert result.returncode == 0, result.stderr
    _, services = parse_plan(result.stdout)
    assert services["bge_embed"] == ("BgeEmbed", port, "busy")
    assert f"port {port} is in use" in result.stderr


SLEEPER = "import time; print('ready', flush=True); time.sleep(600)"


def spawn(code: str, *argv: str) -> subprocess.Popen:
    """`python -c code argv...`, returned once the code has printed its first line (it is set up then)."""
    process = subprocess.Popen(
        [sys.executable, "-c", code, *argv], start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return process


def write_record(run_dir: Path, name: str, pid: int, class_name: str, port: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{name}.pid").write_text(f"{pid} {class_name} {port}\n")


def test_stop_never_signals_a_process_it_did_not_start(tmp_path):
    """A PID file whose pid now belongs to another program (pid reuse) must not get that program killed."""
    stranger = spawn(SLEEPER)
    try:
        write_record(tmp_path, "bge_embed", stranger.pid, "BgeEmbed", 6012)
        status = run_launcher("status", "--run-dir", str(tmp_path), "--log-dir", str(tmp_path))
        assert status.returncode == 1 and "exited" in status.stdout
        stop = run_launcher("stop", "--run-dir", str(tmp_path))
        assert stop.returncode == 0 and "not a service this script started" in stop.stdout
        time.sleep(0.5)
        assert stranger.poll() is None  # still running
        assert not (tmp_path / "bge_embed.pid").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_stop_terminates_its_own_service_and_kills_one_that_ignores_sigterm(tmp_path):
    # Stand-ins whose command lines are those of `bentoml serve service:<Class> --port <port>`.
    polite = spawn(SLEEPER, "bentoml", "serve", "service:BgeEmbed", "--port", "6012")
    stubborn = spawn(
        "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + SLEEPER,
        "bentoml", "serve", "service:Qwen3Embed8B", "--port", "6014",
    )  # fmt: skip
    try:
        write_record(tmp_path, "bge_embed", polite.pid, "BgeEmbed", 6012)
        write_record(tmp_path, "qwen3_8b_embed", stubborn.pid, "Qwen3Embed8B", 6014)
        status = run_launcher("status", "--run-dir", str(tmp_path), "--log-dir", str(tmp_path))
        assert "starting" in status.stdout  # ours and alive, but no /health
        stop = run_launcher("stop", "--run-dir", str(tmp_path), "--grace", "2")
        assert stop.returncode == 0, stop.stderr
        assert f"stopped bge_embed (pid {polite.pid})" in stop.stdout
        assert f"killed qwen3_8b_embed (pid {stubborn.pid})" in stop.stdout
        assert polite.wait(timeout=HANG_GUARD_SECONDS) == -15 and stubborn.wait(timeout=HANG_GUARD_SECONDS) == -9
        assert list(tmp_path.glob("*.pid")) == []
    finally:
        for process in (polite, stubborn):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_pid_file_names_a_different_class_or_port_is_not_ours(tmp_path):
    process = spawn(SLEEPER, "bentoml", "serve", "service:BgeEmbed", "--port", "6012")
    try:
        assert launcher.is_ours(launcher.Record("bge_embed", process.pid, "BgeEmbed", 6012))
        assert not launcher.is_ours(launcher.Record("bge_embed", process.pid, "BgeEmbed", 6013))
        assert not launcher.is_ours(launcher.Record("bge_embed", process.pid, "Qwen3Embed8B", 6012))
    finally:
        process.kill()
        process.wait()


def test_a_supervisor_is_ours_by_the_same_rule_and_another_launcher_command_is_not(tmp_path):
    supervising = spawn(
        SLEEPER,
        "-m", "embed_ops.launcher", "supervise", "bge_embed", "service:BgeEmbed", "--port", "6012",
    )  # fmt: skip
    watching = spawn(SLEEPER, "-m", "embed_ops.launcher", "watch", "service:BgeEmbed")
    try:
        assert launcher.is_ours(launcher.Record("bge_embed", supervising.pid, "BgeEmbed", 6012))
        assert not launcher.is_ours(launcher.Record("bge_embed", supervising.pid, "BgeEmbed", 6013))
        assert not launcher.is_ours(launcher.Record("bge_embed", watching.pid, "BgeEmbed", 6012))
    finally:
        for process in (supervising, watching):
            process.kill()
            process.wait()


def test_log_report_leads_with_the_first_error(tmp_path):
    log = tmp_path / "x.log"
    log.write_text(
        "starting\nTraceback (most recent call last):\n  File x\n"
        "embed_core.errors.ModelLoadError: QWEN3_4B_EMBED_MODEL='/nope': no such directory\n"
        + "noise\n" * 40
        + "RuntimeError: No active process found for watcher.\n"
    )
    report = launcher.log_report(log)
    cause = "embed_core.errors.ModelLoadError: QWEN3_4B_EMBED_MODEL='/nope': no such directory"
    assert report[0] == f"    first error: {cause}"
    assert report[-1].endswith("RuntimeError: No active process found for watcher.")
    assert len(report) == 2 + launcher.LOG_TAIL_LINES


def test_no_names_means_the_default_profile_or_embed_profile(tmp_path):
    run_dir = str(tmp_path / "run")
    default = run_launcher("plan", "--run-dir", run_dir, env={"EMBED_PROFILE": ""})
    assert list(parse_plan(default.stdout)[1]) == list(PROFILES["high"].services)
    chosen = run_launcher("plan", "--run-dir", run_dir, env={"EMBED_PROFILE": "light"})
    assert list(parse_plan(chosen.stdout)[1]) == list(PROFILES["light"].services)
