"""python -m embed_client index PHOTOS_DIR | search "QUERY" | copy --to URL: the photo pipeline from a terminal.

Exit codes: 0 done; 1 a service or file problem (the message says which); 2 a wrong command line; 3 a store
that cannot be used as asked (not a store, vectors of another size, nothing indexed yet); 75 a store
another process is using (try again later).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .client import EmbedClientError
from .index import DEFAULT_SERVICE, DEFAULT_TEXT_SERVICE, index_folder
from .search import CAPTION_QUERY_INSTRUCTION, SearchHit, search
from .store import DEFAULT_COLLECTION, DEFAULT_STORE, DEFAULT_WAIT, PhotoStore, StoreError, copy_store, date_bound


def _text_service(value: str) -> str | None:
    return None if value.strip().lower() in ("", "none", "off") else value


def _date(value: str) -> str:
    try:
        return date_bound(value) or ""
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _notify(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=DEFAULT_STORE,
        help=f"a folder, :memory:, or a Qdrant server's URL (default: $EMBED_PHOTO_STORE or {DEFAULT_STORE})",
    )
    parser.add_argument("--collection", default=DEFAULT_COLLECTION)


def _common(parser: argparse.ArgumentParser) -> None:
    _store_options(parser)
    parser.add_argument("--service", default=DEFAULT_SERVICE, help=f"the SigLIP2 service (default {DEFAULT_SERVICE})")
    parser.add_argument(
        "--text-service",
        type=_text_service,
        default=DEFAULT_TEXT_SERVICE,
        help=f"the caption embedder, or `none` (default {DEFAULT_TEXT_SERVICE})",
    )


def table(hits: Sequence[SearchHit], caption_width: int = 60) -> str:
    """Rank, SigLIP's match probability (text queries), the score that ordered the results, the path (and
    how many copies it has), the caption."""
    rows = [["rank", "match", "score", "path", "caption"]]
    for hit in hits:
        caption = (hit.caption or "").replace("\n", " ")
        if len(caption) > caption_width:
            caption = caption[: caption_width - 1] + "…"
        match = f"{hit.match:.0%}" if hit.match is not None else "-"
        path = hit.path + (
            f" (+{len(hit.copies)} {'copy' if len(hit.copies) == 1 else 'copies'})" if hit.copies else ""
        )
        rows.append([str(hit.rank), match, f"{hit.score:.4f}", path, caption])
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join([*(row[i].ljust(widths[i]) for i in range(4)), row[4]]).rstrip() for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embed_client", description=__doc__.split(":")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="index a folder of photos (incremental: run it again any time)")
    index.add_argument("folder", metavar="PHOTOS_DIR")
    _common(index)
    index.add_argument("--captions", metavar="FILE", help="a JSON or CSV sidecar of path -> caption")
    index.add_argument("--batch-size", type=int, default=16, help="images per request (default 16)")
    index.add_argument("--concurrency", type=int, default=2, help="requests in flight (default 2)")
    index.add_argument("--max-wait", type=float, default=300, help="seconds to wait for a service that is down")
    index.add_argument(
        "--retry-failed", action="store_true", help="send files the service refused before again, even unchanged"
    )
    bar = index.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", default=None, help="a progress bar even when not a terminal")
    bar.add_argument("--no-progress", dest="progress", action="store_false")

    find = commands.add_parser("search", help="search the indexed photos")
    find.add_argument("query", nargs="?", help="what to look for, in words")
    find.add_argument("--like", metavar="PHOTO", help="instead of words: the photos most like this one")
    _common(find)
    find.add_argument("--top", type=int, default=20)
    find.add_argument("--candidates", type=int, help="candidates per list for fusion and reranking (3 x top)")
    find.add_argument("--rerank", metavar="URL", help="a reranker service to reorder the captioned candidates")
    find.add_argument(
        "--caption-instruction",
        default=CAPTION_QUERY_INSTRUCTION,
        help="the caption embedder's query instruction ('' for none)",
    )
    find.add_argument(
        "--using",
        choices=["image", "caption"],
        action="append",
        help="search only the pictures or only the captions (default: both, fused)",
    )
    find.add_argument("--after", type=_date, metavar="DATE", help="taken on or after (2019, 2019-07, 2019-07-14)")
    find.add_argument("--before", type=_date, metavar="DATE", help="taken before this date")
    find.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT,
        help=f"seconds to wait for an indexing run to hand the store over (default {DEFAULT_WAIT:.0f})",
    )
    find.add_argument("--html", metavar="FILE", help="also write a results page with thumbnails")
    find.add_argument("--json", action="store_true", help="one JSON object per result instead of a table")

    copy = commands.add_parser(
        "copy", help="copy the index to another store (a Qdrant server): stored vectors, nothing embedded again"
    )
    _store_options(copy)
    copy.add_argument("--to", required=True, metavar="STORE", help="a Qdrant server's URL (or another folder)")
    copy.add_argument("--to-collection", help="the collection there (default: the same name)")

    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "index":
            return _index(args)
        if args.command == "copy":
            return _copy(args)
        return _search(args)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (EmbedClientError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


COMMON = ("store", "collection", "service", "text_service")  # the options _common adds


def _options(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names}


def _index(args: argparse.Namespace) -> int:
    options = ("captions", "batch_size", "concurrency", "max_wait", "progress", "retry_failed")
    report = index_folder(args.folder, notify=_notify, **_options(args, *COMMON, *options))
    print(report.summary())
    for note in report.notes:
        print(f"note: {note}")
    if report.handed_over:
        print(f"note: handed the store over to waiting searches {report.handed_over} times")
    if report.errors:
        print(f"{len(report.errors)} files not indexed:")
        for error in report.errors:
            earlier = " (refused on an earlier run; unchanged since, not sent again)" if error.earlier else ""
            print(f"  {error.path}: {error.reason}{earlier}")
    return 0


def _copy(args: argparse.Namespace) -> int:
    with (
        PhotoStore(args.store, args.collection, create=False, role="copy", notify=_notify) as source,
        PhotoStore(args.to, args.to_collection or args.collection, create=True, role="copy", notify=_notify) as target,
    ):
        count = copy_store(source, target)
    print(f"copied {count} points from {args.store} to {args.to} (collection {args.to_collection or args.collection})")
    return 0


def _search(args: argparse.Namespace) -> int:
    options = ("like", "caption_instruction", "top", "rerank", "candidates", "after", "before", "wait")
    using = args.using or ("image", "caption")
    hits = search(args.query, using=using, notify=_notify, **_options(args, *COMMON, *options))
    if args.json:
        for hit in hits:
            print(json.dumps(hit.as_json(), ensure_ascii=False))
    else:
        print(table(hits))
    if args.html:
        from .html import write_html

        page = write_html(hits, args.html, f"{args.query or os.path.basename(args.like)}: {len(hits)} photos")
        print(f"wrote {page}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
