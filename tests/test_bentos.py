"""Every Bento builds offline, and what it would put in an image is right: CUDA base, the service's
dependencies, torch from PyPI (never this machine's CPU build), its own code, no weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from embed_core.table import SERVICES

REPO = Path(__file__).resolve().parent.parent
BENTOS = {name: REPO / "bentos" / f"{name}.yaml" for name in SERVICES}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_generated_files_are_up_to_date():
    result = subprocess.run([sys.executable, "deploy/generate.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", list(SERVICES))
def test_bentofile_names_the_tables_class_and_model_variable(name):
    spec = SERVICES[name]
    config = load(BENTOS[name])
    assert config["service"] == f"service:{spec.class_name}"
    assert config["name"] == name
    assert config["python"]["lock_packages"] is False
    assert [env["name"] for env in config["envs"]] == [spec.model_env]
    assert config["envs"][0]["value"].startswith("/models/")  # mounted, never baked in
    assert "models" not in config


def test_root_bentofile_is_one_of_the_six():
    root = load(REPO / "bentofile.yaml")
    assert root == load(BENTOS["qwen3_8b_embed"])


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """`bentoml build -f bentos/<name>.yaml` for all six, in a throwaway BentoML home, with the network
    made unusable: a build that tried to lock packages or fetch anything would fail."""
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "PIP_NO_INDEX": "1",
        "UV_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }

    def build_one(name: str) -> Path:
        result = subprocess.run(
            [sys.executable, "-m", "bentoml", "build", "-f", f"bentos/{name}.yaml", "-o", "tag"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"
        [tag] = [line.split("__tag__:", 1)[1].strip() for line in result.stdout.splitlines() if "__tag__:" in line]
        bento_name, version = tag.split(":")
        assert bento_name == name
        return home / "bentos" / bento_name / version

    return build_one


@pytest.mark.parametrize("name", list(SERVICES))
def test_bento_builds_offline_with_a_cuda_image_and_the_services_dependencies(build, name):
    spec = SERVICES[name]
    bento = build(name)
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    base = next(line for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert base.startswith("FROM nvidia/cuda:12.") and "cudnn-runtime" in base
    assert "EXPOSE 3000" in dockerfile  # what `docker run -p <port>:3000` and deploy/ map
    assert f"ENV {spec.model_env}=" in dockerfile

    requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    from packaging.requirements import Requirement

    # Compared as requirements: BentoML rewrites an environment marker's quotes.
    written = {str(Requirement(line)) for line in requirements if line.strip() and not line.startswith("#")}
    for dependency in declared:
        assert str(Requirement(dependency)) in written, dependency
    torch_lines = [line for line in requirements if line.startswith("torch")]
    # The bare PyPI requirement: on Linux x86_64 PyPI's torch wheels are the CUDA builds.
    assert torch_lines == ["torch>=2.5"]
    assert not (bento / "env" / "python" / "requirements.lock.txt").exists()  # no lock of the CPU torch here
    install = (bento / "env" / "python" / "install.sh").read_text()
    assert "PIP_ARGS=()" in install  # no index of this machine, no CPU-only index
    assert not any("+cpu" in line or "whl/cpu" in line for line in requirements)

    manifest = load(bento / "bento.yaml")
    assert manifest["models"] == [] and manifest["entry_service"] == name
    assert manifest["services"][0]["config"]["resources"] == {"gpu": 1}
    source = bento / "src"
    assert (source / "service.py").is_file() and (source / "embed_core" / "table.py").is_file()
    from deploy.generate import SERVER_MODULES, SERVER_PACKAGES

    assert [module for module in SERVER_MODULES if not (source / f"{module}.py").is_file()] == []
    assert [package for package in SERVER_PACKAGES if not (source / package / "__init__.py").is_file()] == []
    assert not (source / "embed_ops").exists() and not (source / "embed_client").exists()  # not the server's
    assert not (source / "tests").exists()
    weights = [p for p in bento.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")]
    assert weights == []
