"""What sending a batch of 12-MP photos costs, as base64 JSON and as multipart files, on each side (CPU).

    python bench/upload_cost.py
    python bench/upload_cost.py --write BENCHMARKS.md

16 JPEGs of bench/index_corpus.py's photos (4032 x 3024) per request, as `embed_client.index_folder` sends
them. CPU ms per photo, in process, the best of `--repeats`:
- the client: building and encoding the request body with httpx (base64 JSON, as the client sent it before
  2026-12-02; multipart, as `EmbedClient.embed_images` sends it now);
- the server, before the model: the JSON body through pydantic (what BentoML does with it) and the base64
  decode (runners/images.py); the multipart body through Starlette's own form reading (files over 1 MB go
  to temporary files) and through `embed_http.forms.read_form` (kept in memory).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import httpx  # noqa: E402
from cpu_serving import append_report, machine  # noqa: E402
from index_corpus import jpeg, photo  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from embed_client import EmbedClient  # noqa: E402
from embed_http.forms import read_form  # noqa: E402
from runners.images import ImageLimits, bytes_from_base64  # noqa: E402
from tests.test_forms import request_for  # noqa: E402

PER_REQUEST = 16


class JsonImages(BaseModel):
    images: list[str]


def cpu_ms_per_photo(work, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return 1000 * best / PER_REQUEST


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", type=Path, help="append the results (markdown) to this file")
    args = parser.parse_args()

    photos = [jpeg(photo(seed)) for seed in range(4)] * (PER_REQUEST // 4)
    http = httpx.Client()

    def client_json() -> None:
        body = {"images": [base64.b64encode(data).decode("ascii") for data in photos]}
        http.build_request("POST", "http://siglip/embed/images", json=body).read()

    answer = httpx.Response(200, json={"embeddings": [[0.0]] * PER_REQUEST, "dimension": 1})
    client = EmbedClient("http://siglip", transport=httpx.MockTransport(lambda request: request.read() and answer))

    json_body = httpx.Request("POST", "http://x/", json={"images": [base64.b64encode(d).decode() for d in photos]})
    json_bytes = json_body.read()
    files = [("images", (f"{index}.jpg", data, "image/jpeg")) for index, data in enumerate(photos)]
    form = httpx.Request("POST", "http://x/", files=files)
    form_bytes, form_type = form.read(), form.headers["content-type"]
    limits = ImageLimits()

    def server_json() -> None:
        for text in JsonImages.model_validate_json(json_bytes).images:
            bytes_from_base64(text, limits, "images")

    def server_form(read) -> None:
        async def run() -> None:
            found = await read(request_for(form_bytes, form_type))
            for upload in found.getlist("images"):
                await upload.read()
                await upload.close()

        asyncio.run(run())

    part_limit = 64 * 1024 * 1024
    rows = {
        "client, base64 JSON (before)": cpu_ms_per_photo(client_json, args.repeats),
        "client, multipart (EmbedClient.embed_images)": cpu_ms_per_photo(
            lambda: client.embed_images(photos), args.repeats
        ),
        "server, base64 JSON: pydantic + base64 decode": cpu_ms_per_photo(server_json, args.repeats),
        "server, multipart: Starlette's form reading": cpu_ms_per_photo(
            lambda: server_form(lambda request: request.form(max_part_size=part_limit)), args.repeats
        ),
        "server, multipart: read_form (in memory)": cpu_ms_per_photo(
            lambda: server_form(lambda request: read_form(request, "multipart/form-data", part_limit)), args.repeats
        ),
    }
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### Sending 12-MP photos: base64 JSON or multipart ({date})",
        "",
        f"Machine: {machine()}. Command: `python bench/upload_cost.py --repeats {args.repeats}` ({PER_REQUEST} "
        f"JPEGs of 4032 x 3024 per request, {len(json_bytes) / 1e6:.1f} MB as JSON, {len(form_bytes) / 1e6:.1f} MB "
        "as multipart; CPU ms per photo, the best of the repeats).",
        "",
        "| step | CPU ms per photo |",
        "|---|---|",
        *(f"| {name} | {value:.2f} |" for name, value in rows.items()),
    ]
    print("\n".join(lines))
    append_report(args.write, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
