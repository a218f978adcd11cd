"""`python -m embed_ops.download`: argument handling and the export lines, with the hub call replaced."""

from __future__ import annotations

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
