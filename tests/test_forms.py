"""The image APIs' multipart forms: uploads read in order and kept in memory, not spooled to disk."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from starlette.requests import Request

from bench.index_corpus import jpeg, photo
from embed_http.forms import read_form


def request_for(body: bytes, content_type: str) -> Request:
    chunks = [body[start : start + 65536] for start in range(0, len(body), 65536)]

    async def receive() -> dict:
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    headers = [(b"content-type", content_type.encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": headers}, receive)


def open_files() -> set[tuple[str, str]]:
    """This process's open files on disk, as (fd, path): sockets, pipes and the like are not files."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own fd, or another thread's)
            continue
        if target.startswith("/"):
            found.add((fd, target))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through Linux's /proc")
def test_uploaded_photos_stay_in_memory_and_in_order():
    """Starlette's own form reading writes each file over 1 MB to a temporary file (an open file per photo
    while the form lives); the image APIs' keeps them in memory, within the same per-part limit."""
    photos = [jpeg(photo(seed)) for seed in (1, 2, 3)]  # 12-MP JPEGs, over 1 MB each
    assert all(len(data) > 1024 * 1024 for data in photos)
    built = httpx.Request(
        "POST", "http://x/", files=[("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
    )
    body, content_type = built.read(), built.headers["content-type"]

    async def held_files(read) -> tuple[int, list[bytes]]:
        before = open_files()
        form = await read(request_for(body, content_type))
        opened = open_files() - before  # files opened by the read (one another closes meanwhile does not count)
        return len(opened), [await upload.read() for upload in form.getlist("images")]

    limit = 64 * 1024 * 1024
    spooled, _ = asyncio.run(held_files(lambda request: request.form(max_part_size=limit)))
    assert spooled == len(photos)  # the check sees Starlette's temporary files
    in_memory, read = asyncio.run(held_files(lambda request: read_form(request, "multipart/form-data", limit)))
    assert in_memory == 0
    assert read == photos
