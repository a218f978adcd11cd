"""`python -m embed_ops.download`: argument handling and the export lines, with the hub call replaced."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from embed_ops import download


@pytest.fixture
def fetched(monkeypatch):
    """Replace the one network call: record it and make the directory, as a hub would."""
    calls: list[tuple[str, str, Path, list[str]]] = []

    def fake_fetch(source: str, repo_id: str, local_dir: Path, ignore_patterns: list[str]) -> Path:
        calls.append((source, repo_id, local_dir, ignore_patterns))
        local_dir.mkdir(parents=True, exist_ok=True)
        return local_dir

    monkeypatch.setattr(download, "fetch", fake_fetch)
    return calls


def test_downloads_each_repository_once_and_prints_the_exports(fetched, tmp_path, capsys):
    assert download.main(["qwen3_8b_embed", "qwen3_4b_embed", "qwen3_4b_rerank", "--to", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"export QWEN3_8B_EMBED_MODEL={tmp_path}/Qwen3-Embedding-8B",
        f"export QWEN3_4B_EMBED_MODEL={tmp_path}/Z-Image-Turbo",
        f"export QWEN3_4B_RERANK_MODEL={tmp_path}/Z-Image-Turbo",
    ]
    # Z-Image-Turbo is shared by the two Qwen3-4B services: fetched once, without its diffusion parts.
    assert [(source, repo) for source, repo, _, _ in fetched] == [
        ("huggingface", "Qwen/Qwen3-Embedding-8B"),
        ("huggingface", "Tongyi-MAI/Z-Image-Turbo"),
    ]
    assert {"transformer/*", "vae/*"} <= set(fetched[1][3])


def test_profile_and_source(fetched, tmp_path, capsys):
    download.main(["--profile", "high", "--to", str(tmp_path / "models"), "--source", "modelscope"])
    out = capsys.readouterr().out.splitlines()
    assert [line.split("=")[0] for line in out] == [
        "export SIGLIP2_EMBED_MODEL",
        "export QWEN3_8B_EMBED_MODEL",
        "export QWEN3_8B_RERANK_MODEL",
    ]
    assert {source for source, *_ in fetched} == {"modelscope"}
    assert [local_dir for *_, local_dir, _ in fetched] == [
        tmp_path / "models" / "siglip2-so400m-patch16-512",
        tmp_path / "models" / "Qwen3-Embedding-8B",
        tmp_path / "models" / "Qwen3-Reranker-8B",
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["qwen3_9b_embed", "--to", "x"], "unknown service(s): qwen3_9b_embed"),
        (["--to", "x"], "name at least one service"),
        (["bge_embed"], "--to"),
        (["bge_embed", "--to", "x", "--source", "github"], "invalid choice"),
        (["--profile", "demo", "--to", "x"], "invalid choice"),  # demo needs no download
    ],
)
def test_bad_arguments_are_refused_before_any_download(fetched, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        download.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert fetched == []


def test_printed_exports_survive_a_shell_with_spaces_in_the_path(fetched, tmp_path, capsys):
    target = tmp_path / "my models"
    download.main(["bge_embed", "--to", str(target)])
    exports = capsys.readouterr().out
    shell = subprocess.run(
        ["bash", "-c", f'{exports}\nprintf %s "$BGE_EMBED_MODEL"'], capture_output=True, text=True, check=True
    )
    assert shell.stdout == str(target / "bge-large-zh-v1.5")


def test_huggingface_fetch_asks_for_the_directory_and_skips_the_ignored_parts(monkeypatch, tmp_path):
    import huggingface_hub

    asked = {}

    def fake_snapshot_download(repo_id, **kwargs):
        asked.update(repo_id=repo_id, **kwargs)
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    path = download.fetch("huggingface", "BAAI/bge-large-zh-v1.5", tmp_path / "bge", ["*.onnx"])
    assert path == tmp_path / "bge"
    assert asked == {
        "repo_id": "BAAI/bge-large-zh-v1.5",
        "local_dir": str(tmp_path / "bge"),
        "ignore_patterns": ["*.onnx"],
    }


def test_the_command_line_entry_point_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "embed_ops.download", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0 and "--source" in result.stdout and "--profile" in result.stdout


def hub_error(name: str, message: str) -> Exception:
    """One of huggingface_hub's own errors (built without the HTTP response its constructor wants)."""
    from huggingface_hub import errors

    cls = getattr(errors, name)
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


FAILURES = [
    (lambda: hub_error("GatedRepoError", "403 Forbidden: gated"), {}, "gated: accept its terms"),
    (lambda: hub_error("RepositoryNotFoundError", "401 Client Error"), {}, "not found on huggingface: check the id"),
    (lambda: OSError(28, "No space left on device"), {}, "the disk is full at"),
    (lambda: hub_error("LocalEntryNotFoundError", "cannot find"), {"HF_HUB_OFFLINE": "0"}, "no network: huggingface"),
    (lambda: hub_error("LocalEntryNotFoundError", "cannot find"), {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    (lambda: RuntimeError("something odd\nsecond line"), {}, "RuntimeError: something odd"),
]


@pytest.mark.parametrize(("error", "env", "cause"), FAILURES)
def test_a_failed_download_says_which_model_why_and_what_to_do_in_one_line(
    monkeypatch, tmp_path, capsys, error, env, cause
):
    fetched = []

    def failing_fetch(source: str, repo_id: str, local_dir: Path, ignore_patterns: list[str]) -> Path:
        fetched.append(repo_id)
        if repo_id == "Qwen/Qwen3-Reranker-8B":
            raise error()
        local_dir.mkdir(parents=True)
        return local_dir

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(download, "fetch", failing_fetch)
    code = download.main(["qwen3_8b_embed", "qwen3_8b_rerank", "bge_embed", "--to", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 1
    assert fetched == ["Qwen/Qwen3-Embedding-8B", "Qwen/Qwen3-Reranker-8B"]  # stops at the failure
    [error_line] = [line for line in err.splitlines() if not line.startswith("[")]
    assert error_line.startswith("error: could not download Qwen/Qwen3-Reranker-8B (for qwen3_8b_rerank): ")
    assert cause in error_line and "Traceback" not in err
    # What arrived is exported; the last line makes `eval "$(...)"` fail (stdout is not a terminal here).
    assert out.splitlines() == [f"export QWEN3_8B_EMBED_MODEL={tmp_path}/Qwen3-Embedding-8B", "false"]


def test_eval_of_a_failed_download_fails_in_a_real_shell(tmp_path):
    """The README's `eval "$(...)"` form, with the hub unreachable (a refusing proxy): the shell sees the failure."""
    script = f'eval "$({shlex.quote(sys.executable)} -m embed_ops.download bge_embed --to {tmp_path})" && echo reached'
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    env.pop("BGE_EMBED_MODEL", None)
    shell = subprocess.run(
        ["bash", "-c", script + '; echo "status=$? model=${BGE_EMBED_MODEL-unset}"'],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent, env=env, timeout=300,
    )  # fmt: skip
    assert shell.stdout.splitlines() == ["status=1 model=unset"]  # not "reached"
    assert "error: could not download BAAI/bge-large-zh-v1.5 (for bge_embed): no network" in shell.stderr
    assert "Traceback" not in shell.stderr


def test_refused_arguments_fail_an_eval_too(tmp_path):
    script = f'eval "$({shlex.quote(sys.executable)} -m embed_ops.download bge_9b --to {tmp_path})"; echo "status=$?"'
    shell = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert shell.stdout.splitlines() == ["status=1"] and "unknown service(s): bge_9b" in shell.stderr
