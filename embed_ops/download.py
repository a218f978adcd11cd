"""Download the services' weights once, into directories the services are then pointed at.

    python -m embed_ops.download qwen3_8b_embed qwen3_8b_rerank --to /models [--source huggingface|modelscope]
    python -m embed_ops.download --profile high --to /models
    eval "$(python -m embed_ops.download bge_embed --to /models)"   # sets BGE_EMBED_MODEL

Each model goes to `<DIR>/<repository name>` (e.g. /models/Qwen3-Embedding-8B, the path the
containers and deploy/ files expect). The hub's own progress bars go to stderr; stdout carries only
the `export <NAME>_MODEL=...` lines. Z-Image-Turbo is fetched without its diffusion parts: the
Qwen3-4B services read only its text_encoder/ and tokenizer/.

A download that fails stops the command with one line on stderr (the model, the cause, what to do)
and exit status 1; when stdout is not a terminal (`eval "$(...)"`), its last line is then `false`,
so that the `eval` fails too instead of succeeding with the variable unset.
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from embed_core.table import SERVICES, ServiceSpec

from .profiles import PROFILES

SOURCES = ("huggingface", "modelscope")
DEFAULT_SOURCE = "huggingface"


def model_dir_name(spec: ServiceSpec) -> str:
    """The directory a service's weights are downloaded to (and mounted at, in containers)."""
    return spec.default_model.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class Download:
    repo_id: str
    local_dir: Path
    services: list[ServiceSpec] = field(default_factory=list)


def plan(names: Iterable[str], to: Path, models: Mapping[str, str] | None = None) -> list[Download]:
    """One download per repository: the two Qwen3-4B services share Z-Image-Turbo. `models`: a profile's
    checkpoints instead of the table's."""
    downloads: dict[str, Download] = {}
    for name in names:
        spec = SERVICES[name]
        repo_id = (models or {}).get(name, spec.default_model)
        item = downloads.setdefault(repo_id, Download(repo_id, to / repo_id.rstrip("/").rsplit("/", 1)[-1]))
        if spec not in item.services:
            item.services.append(spec)
    return list(downloads.values())


def fetch(source: str, repo_id: str, local_dir: Path, ignore_patterns: list[str]) -> Path:
    """The one call that reaches a hub (tests replace it). Both hubs resume partial downloads."""
    if source == "modelscope":
        try:
            from modelscope import snapshot_download as modelscope_download
        except ImportError:
            raise SystemExit("--source modelscope needs the ModelScope client: pip install modelscope") from None
        return Path(modelscope_download(repo_id, local_dir=str(local_dir), ignore_patterns=ignore_patterns))
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, local_dir=str(local_dir), ignore_patterns=ignore_patterns))


class DownloadFailed(Exception):
    """One model could not be fetched; the message names it, the cause and the remedy."""


def why_it_failed(exc: BaseException, source: str, repo_id: str, local_dir: Path) -> str:
    """The cause of a failed download in a person's words, with what to do about it."""
    from huggingface_hub import errors as hub

    if isinstance(exc, hub.GatedRepoError):
        return (
            f"gated: accept its terms at https://huggingface.co/{repo_id}, then log in (`hf auth login`, or HF_TOKEN)"
        )
    if isinstance(exc, (hub.RepositoryNotFoundError, hub.RevisionNotFoundError, hub.RemoteEntryNotFoundError)):
        return f"not found on {source}: check the id (a private repository needs HF_TOKEN)"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"the disk is full at {local_dir}: free some space, or download --to another disk"
    if isinstance(exc, PermissionError):
        return f"cannot write to {local_dir}: choose a --to directory you own"
    if isinstance(exc, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            return "HF_HUB_OFFLINE is set, so the hub is not asked: unset it to download"
        return (
            f"no network: {source} could not be reached; check the connection or proxy "
            "(or set HF_ENDPOINT to a mirror), then run this again: it resumes"
        )
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}"


def fetch_or_explain(source: str, item: Download, ignore_patterns: list[str]) -> Path:
    try:
        return fetch(source, item.repo_id, item.local_dir, ignore_patterns)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        names = ", ".join(spec.seed_name for spec in item.services)
        reason = why_it_failed(exc, source, item.repo_id, item.local_dir)
        raise DownloadFailed(f"could not download {item.repo_id} (for {names}): {reason}") from exc


def export_lines(downloads: list[Download], paths: list[Path]) -> list[str]:
    return [
        f"export {spec.model_env}={shlex.quote(str(path))}"
        for item, path in zip(downloads, paths, strict=True)
        for spec in item.services
    ]


def main(argv: Iterable[str] | None = None) -> int:
    try:
        return download(argv)
    except SystemExit as stop:  # argparse's refusals, a missing ModelScope client: `eval` must fail as well
        if stop.code not in (0, None):
            print("\n".join(eval_fails()))
        raise


def download(argv: Iterable[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embed_ops.download",
        description="Download the weights of the named services (or of a profile) and print the "
        "`export <NAME>_MODEL=...` lines that point the services at them.",
    )
    parser.add_argument("services", nargs="*", metavar="SERVICE", help=f"one of: {', '.join(SERVICES)}")
    parser.add_argument("--profile", choices=[name for name, p in PROFILES.items() if p.uses_gpu or p.models])
    parser.add_argument("--to", type=Path, required=True, metavar="DIR", help="where the model directories go")
    parser.add_argument("--source", choices=SOURCES, default=DEFAULT_SOURCE, help=f"default: {DEFAULT_SOURCE}")
    args = parser.parse_args(list(argv) if argv is not None else None)

    unknown = [name for name in args.services if name not in SERVICES]
    if unknown:
        parser.error(f"unknown service(s): {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    names = list(args.services) + (list(PROFILES[args.profile].services) if args.profile else [])
    if not names:
        parser.error("name at least one service, or a --profile")

    from embed_core.config import HUB_IGNORE

    to = args.to.expanduser().resolve()
    to.mkdir(parents=True, exist_ok=True)
    downloads = plan(names, to, PROFILES[args.profile].models if args.profile else None)
    paths = []
    for number, item in enumerate(downloads, 1):
        print(f"[{number}/{len(downloads)}] {item.repo_id} -> {item.local_dir} ({args.source})", file=sys.stderr)
        try:
            paths.append(fetch_or_explain(args.source, item, list(HUB_IGNORE)))
        except DownloadFailed as failure:
            # What did arrive is still exported; `false` makes `eval "$(...)"` fail as the command did.
            print("\n".join([*export_lines(downloads[: len(paths)], paths), *eval_fails()]))
            print(f"error: {failure}", file=sys.stderr)
            return 1
    print("\n".join(export_lines(downloads, paths)))
    return 0


def eval_fails() -> list[str]:
    """`false` where stdout is read by a shell (`eval "$(...)"`); nothing on a terminal, where it would be noise."""
    return [] if sys.stdout.isatty() else ["false"]


if __name__ == "__main__":
    sys.exit(main())
