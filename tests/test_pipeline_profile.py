"""The photos-cpu profile: SigLIP2 base/16 @224 on CPU, downloaded once by the project's download command."""

from __future__ import annotations

from pathlib import Path

from embed_ops import download
from embed_ops.profiles import PROFILES, profile_env

BASE_224 = "google/siglip2-base-patch16-224"  # the smallest SigLIP2 checkpoint (86M-parameter vision tower)


def test_photos_cpu_profile_runs_the_base_checkpoint_on_cpu_unless_the_user_chose_one():
    profile = PROFILES["photos-cpu"]
    assert profile.services == ("siglip2_embed",) and not profile.uses_gpu
    assert profile_env(profile, {}) == {"SIGLIP2_EMBED_DEVICE": "cpu", "SIGLIP2_EMBED_MODEL": BASE_224}
    assert "SIGLIP2_EMBED_MODEL" not in profile_env(profile, {"SIGLIP2_EMBED_MODEL": "/models/mine"})


def test_download_of_the_profile_fetches_the_base_checkpoint_and_exports_its_path(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_fetch(source: str, repo_id: str, local_dir: Path, ignore_patterns: list[str]) -> Path:
        calls.append((source, repo_id, local_dir))
        local_dir.mkdir(parents=True)
        return local_dir

    monkeypatch.setattr(download, "fetch", fake_fetch)
    assert download.main(["--profile", "photos-cpu", "--to", str(tmp_path)]) == 0
    assert calls == [("huggingface", BASE_224, tmp_path / "siglip2-base-patch16-224")]
    assert capsys.readouterr().out.splitlines() == [f"export SIGLIP2_EMBED_MODEL={tmp_path}/siglip2-base-patch16-224"]
