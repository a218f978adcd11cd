"""Robustness of each served service over real HTTP: fuzzing against its own OpenAPI document, a table
of bad requests, a concurrent load of good and bad requests, and clients that give up.

One `bentoml serve` per service for the whole module (a module-scoped fixture). A new kind of
service is covered by adding its endpoints to KIND_ENDPOINTS and its tiny checkpoint to
conftest.SERVICE_MODEL_FIXTURES.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import pytest
import torch

from runners.table import SERVICES
from tests.conftest import SERVICE_MODEL_FIXTURES, Served, serve_tiny

pytestmark = pytest.mark.serve

ITEM_LIMIT = 16  # EMBED_MAX_ITEMS_PER_REQUEST for these servers: small, so oversized lists stay cheap
MAX_REQUEST_MB = 12  # EMBED_MAX_REQUEST_MB for these servers (a 10 MB text must still pass)


@dataclass(frozen=True)
class Endpoint:
    route: str
    good: dict[str, Any]  # a request that must succeed
    answer: Callable[[dict[str, Any]], list[list[float]]]  # the numbers in an answer, to compare
    strings: tuple[str, ...] = ()  # required non-blank strings
    string_lists: tuple[str, ...] = ()  # required non-empty lists of non-blank strings, at most ITEM_LIMIT
    options: dict[str, type] = field(default_factory=dict)  # optional fields and their types

    def variant(self, rng: random.Random, pool: list[str]) -> dict[str, Any]:
        """A good request with other texts."""
        body = dict(self.good)
        for name in self.strings:
            body[name] = rng.choice(pool)
        for name in self.string_lists:
            body[name] = rng.sample(pool, rng.randint(1, 4))
        return body


KIND_ENDPOINTS: dict[str, list[Endpoint]] = {
    "text_embedding": [
        Endpoint(
            "/embed/text",
            {"text": "an orange cat sleeps in the sun"},
            answer=lambda body: [body["embedding"]],
            strings=("text",),
            options={"instruction": str, "dimensions": int},
        ),
        Endpoint(
            "/embed/texts",
            {"texts": ["an orange cat", "一只橙色的猫", "a black dog runs on the grass"]},
            answer=lambda body: body["embeddings"],
            string_lists=("texts",),
            options={"instruction": str, "dimensions": int},
        ),
    ],
}

SERVED = [name for name in SERVICE_MODEL_FIXTURES if SERVICES[name].kind in KIND_ENDPOINTS]


@pytest.fixture(scope="module", params=SERVED)
def served(request, tmp_path_factory):
    limits = {"EMBED_MAX_ITEMS_PER_REQUEST": str(ITEM_LIMIT), "EMBED_MAX_REQUEST_MB": str(MAX_REQUEST_MB)}
    yield from serve_tiny(request, request.param, tmp_path_factory, **limits)


def endpoints(served: Served) -> list[Endpoint]:
    return KIND_ENDPOINTS[SERVICES[served.seed_name].kind]


def assert_good(served: Served, endpoint: Endpoint, body: dict[str, Any] | None = None) -> list[list[float]]:
    response = served.post(endpoint.route, json=endpoint.good if body is None else body)
    assert response.status_code == 200, response.text[:500]
    return endpoint.answer(response.json())


# -- fuzzing: schemathesis against GET /docs.json ------------------------------------------------------

FUZZ_CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",  # requests the document calls invalid are refused
]


def test_fuzzing_finds_no_server_error_and_no_answer_outside_the_schema(served, tmp_path):
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "run", f"{served.url}/docs.json"),
        *("--checks", ",".join(FUZZ_CHECKS)),
        *("--phases", "examples,coverage,fuzzing"),
        *("--max-examples", "40", "--seed", "1", "--request-timeout", "30"),
        *("--no-color", "--continue-on-failure", "--workers", "2"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-8000:]
    # It really exercised every API of the service (and BentoML's own routes).
    tested = re.search(r"Tested:\s+(\d+)", report)
    assert tested and int(tested.group(1)) >= len(endpoints(served)), report[-3000:]
    cases = re.search(r"(\d+) generated", report)
    assert cases and int(cases.group(1)) >= 40 * len(endpoints(served)), report[-3000:]
    assert served.get("/health").status_code == 200


# -- the table of bad requests -----------------------------------------------------------------------


def raw(body: bytes, content_type: str = "application/json") -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": content_type}}


def with_field(good: dict[str, Any], name: str, fragment: bytes) -> dict[str, Any]:
    """The good request with one field's JSON replaced by raw bytes (not necessarily valid JSON or UTF-8)."""
    parts = [
        json.dumps(key).encode() + b": " + (fragment if key == name else json.dumps(value).encode())
        for key, value in {**good, name: None}.items()
    ]
    return raw(b"{" + b", ".join(parts) + b"}")


def without(good: dict[str, Any], name: str) -> dict[str, Any]:
    return {"json": {key: value for key, value in good.items() if key != name}}


HUGE_NUMBERS = [b"1e400", b"-1e400", b"1" + b"0" * 400, b"-1" + b"0" * 400, b"123456789012345678901234567890"]
NON_UTF8 = b'"\xff\xfe\xc3\x28 cat"'


def bad_requests(endpoint: Endpoint) -> list[tuple[str, dict[str, Any], int | None]]:
    """(what, httpx arguments, expected status or None for any 4xx)."""
    good = endpoint.good
    body = json.dumps(good).encode()
    cases: list[tuple[str, dict[str, Any], int | None]] = [
        ("empty body", raw(b""), None),
        ("malformed JSON", raw(body[:-1]), None),
        ("trailing garbage", raw(body + b"}"), None),
        ("JSON list", {"json": [good]}, None),
        ("JSON null", raw(b"null"), None),
        ("JSON string", {"json": "text"}, None),
        ("deeply nested JSON", raw(b"[" * 100_000 + b"]" * 100_000), None),
        ("non-UTF-8 body", raw(b"\xff\xfe" + body), None),
        ("form body", raw(b"text=a", "application/x-www-form-urlencoded"), 415),
        ("multipart body without boundary", raw(b"--x--", "multipart/form-data"), 415),
        ("empty object", {"json": {}}, None),
    ]
    for name in endpoint.strings:
        cases += [
            (f"{name} missing", without(good, name), None),
            (f"{name} empty", {"json": {**good, name: ""}}, None),
            (f"{name} whitespace", {"json": {**good, name: " \t\n "}}, None),
            (f"{name} null", {"json": {**good, name: None}}, None),
            (f"{name} number", {"json": {**good, name: 42}}, None),
            (f"{name} bool", {"json": {**good, name: True}}, None),
            (f"{name} list", {"json": {**good, name: [good.get(name, "a")]}}, None),
            (f"{name} object", {"json": {**good, name: {"text": "a"}}}, None),
            (f"{name} non-UTF-8", with_field(good, name, NON_UTF8), None),
            *((f"{name} = {number[:12]!r}", with_field(good, name, number), None) for number in HUGE_NUMBERS),
        ]
    for name in endpoint.string_lists:
        cases += [
            (f"{name} missing", without(good, name), None),
            (f"{name} empty", {"json": {**good, name: []}}, None),
            (f"{name} with an empty item", {"json": {**good, name: ["a cat", ""]}}, None),
            (f"{name} with a blank item", {"json": {**good, name: ["a cat", "  \n"]}}, None),
            (f"{name} a string", {"json": {**good, name: "a cat"}}, None),
            (f"{name} an object", {"json": {**good, name: {"a": "cat"}}}, None),
            (f"{name} with a number", {"json": {**good, name: ["a cat", 42]}}, None),
            (f"{name} with null", {"json": {**good, name: ["a cat", None]}}, None),
            (f"{name} nested", {"json": {**good, name: [["a cat"]]}}, None),
            (f"{name} non-UTF-8", with_field(good, name, b"[" + NON_UTF8 + b"]"), None),
            (f"{name} huge number", with_field(good, name, b"[" + HUGE_NUMBERS[2] + b"]"), None),
            (f"{name} one over the limit", {"json": {**good, name: ["a cat"] * (ITEM_LIMIT + 1)}}, 413),
            (f"{name} 100k items", {"json": {**good, name: ["a cat"] * 100_000}}, 413),
        ]
    for name, kind in endpoint.options.items():
        if kind is str:
            wrong: list[Any] = [42, True, ["a"], {"a": "b"}]
            fragments = [NON_UTF8, *HUGE_NUMBERS[:3]]
        else:
            wrong = ["abc", "32", 32.0, 1.5, True, [32], {"a": 1}, -1, 0, 10**30]
            fragments = HUGE_NUMBERS
        cases += [(f"{name} = {value!r}", {"json": {**good, name: value}}, None) for value in wrong]
        cases += [(f"{name} = {fragment[:12]!r}", with_field(good, name, fragment), None) for fragment in fragments]
    return cases


def test_bad_requests_get_a_json_4xx_and_the_next_good_request_succeeds(served):
    failures = []
    for endpoint in endpoints(served):
        failures += _bad_request_failures(served, endpoint)
    assert not failures, "\n".join(failures)


def _bad_request_failures(served: Served, endpoint: Endpoint) -> list[str]:
    expected = assert_good(served, endpoint)
    failures = []
    for what, request, status in bad_requests(endpoint):
        response = served.post(endpoint.route, **request)
        try:
            error = response.json()
        except ValueError:
            error = None
        ok_status = response.status_code == status if status else 400 <= response.status_code < 500
        if not ok_status or not isinstance(error, dict) or not isinstance(error.get("error"), str):
            failures.append(f"{what}: {response.status_code} {response.text[:200]}")
            continue
        after = served.post(endpoint.route, json=endpoint.good)
        if after.status_code != 200 or not torch.allclose(
            torch.tensor(endpoint.answer(after.json())), torch.tensor(expected), atol=1e-6
        ):
            failures.append(f"{endpoint.route}, the good request after {what!r}: {after.status_code}")
    return [f"{endpoint.route}: {failure}" for failure in failures]


def test_a_10_mb_text_is_answered_cut_to_max_length(served):
    """Not an error: texts longer than max_length tokens are cut (the character cut before tokenizing
    must not change which tokens are kept)."""
    for endpoint in endpoints(served):
        for name in endpoint.strings:
            words = "an orange cat "
            reference = assert_good(served, endpoint, {**endpoint.good, name: words * 400})  # > max_length tokens
            huge = assert_good(served, endpoint, {**endpoint.good, name: words * (10_000_000 // len(words))})
            assert torch.allclose(torch.tensor(huge), torch.tensor(reference), atol=1e-5)


def test_bodies_over_the_size_limit_get_a_413_and_chunked_bodies_under_it_are_served(served):
    for endpoint in endpoints(served):
        expected = assert_good(served, endpoint)
        good = json.dumps(endpoint.good).encode()
        huge = good[:-1] + b', "padding": "' + b"a" * (MAX_REQUEST_MB * 2**20) + b'"}'
        chunked = [huge[i : i + 2**20] for i in range(0, len(huge), 2**20)]
        for request in (raw(huge), {"content": iter(chunked), "headers": {"content-type": "application/json"}}):
            response = served.post(endpoint.route, **request)
            assert response.status_code == 413 and isinstance(response.json()["error"], str), response.text[:300]
        # A body sent in chunks, with no length, is read by the middleware and handed on whole.
        pieces = [good[:5], good[5:-3], good[-3:]]
        response = served.post(endpoint.route, content=iter(pieces), headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text[:300]
        assert torch.allclose(torch.tensor(endpoint.answer(response.json())), torch.tensor(expected), atol=1e-6)


# -- a bounded concurrent load of good and bad requests -----------------------------------------------

CLIENTS = 32
ROUNDS = 4
REQUESTS_PER_ROUND = 200


def text_pool(rng: random.Random, size: int) -> list[str]:
    words = [
        "an",
        "orange",
        "cat",
        "black",
        "dog",
        "sleeps",
        "runs",
        "on",
        "the",
        "grass",
        "in",
        "sun",
        "一只",
        "橙色的猫",
        "黑狗",
        "草地上",
        "奔跑",
        "yes",
        "no",
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 8, 20, 60, 150]))) for _ in range(size)]


def process_tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


async def _run_round(url: str, requests: list[tuple[Endpoint, dict[str, Any] | None, dict[str, Any]]]):
    """Send every request from CLIENTS concurrent clients; return (request index, status, body)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(requests)):
        queue.put_nowait(index)
    answers: list[tuple[int, int, Any]] = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                endpoint, _, request = requests[index]
                response = await client.post(endpoint.route, **request)
                try:
                    body = response.json()
                except ValueError:
                    body = response.text
                answers.append((index, response.status_code, body))

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return answers


def test_concurrent_load_answers_every_good_request_as_if_alone(served):
    rng = random.Random(6)
    service_endpoints = endpoints(served)
    pool = text_pool(rng, 24)
    goods = [(endpoint, endpoint.variant(rng, pool)) for endpoint in service_endpoints for _ in range(20)]
    alone = [assert_good(served, endpoint, body) for endpoint, body in goods]  # one at a time, nothing to share
    bads = [(endpoint, request) for endpoint in service_endpoints for _, request, _ in bad_requests(endpoint)[:12]]

    rss = []
    for _ in range(ROUNDS):
        requests: list[tuple[Endpoint, dict[str, Any] | None, dict[str, Any]]] = []
        expected: dict[int, int] = {}  # request index -> index into goods
        for index in range(REQUESTS_PER_ROUND):
            if rng.random() < 0.75:
                which = rng.randrange(len(goods))
                expected[index] = which
                requests.append((goods[which][0], goods[which][1], {"json": goods[which][1]}))
            else:
                endpoint, request = rng.choice(bads)
                requests.append((endpoint, None, request))
        answers = asyncio.run(_run_round(served.url, requests))
        assert len(answers) == len(requests)
        for index, status, body in answers:
            if index in expected:
                assert status == 200, body
                endpoint = requests[index][0]
                got, want = torch.tensor(endpoint.answer(body)), torch.tensor(alone[expected[index]])
                assert got.shape == want.shape
                assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= 0.9999
                assert torch.allclose(got, want, atol=1e-5)
            else:
                assert 400 <= status < 500 and isinstance(body, dict) and "error" in body, (status, body)
        rss.append(process_tree_rss(served.process.pid))

    assert served.process.poll() is None and served.get("/health").status_code == 200
    # Memory: after a warm-up round, more rounds of the same load must not keep adding memory.
    growth = rss[-1] - rss[0]
    assert growth < max(64 * 2**20, 0.10 * rss[0]), [f"{value / 2**20:.0f} MiB" for value in rss]


# -- clients that give up ----------------------------------------------------------------------------


def test_clients_that_time_out_do_not_wedge_the_service(served):
    endpoint = next(e for e in endpoints(served) if e.string_lists)
    name = endpoint.string_lists[0]
    heavy = {**endpoint.good, name: ["an orange cat " * 400] * ITEM_LIMIT}  # the most work one request can ask
    expected = assert_good(served, endpoint)

    async def give_up() -> int:
        timeout = httpx.Timeout(30, read=0.02)
        async with httpx.AsyncClient(base_url=served.url, timeout=timeout) as client:

            async def one() -> bool:
                try:
                    await client.post(endpoint.route, json=heavy)
                except httpx.ReadTimeout:
                    return True
                return False

            return sum(await asyncio.gather(*(one() for _ in range(12))))

    assert asyncio.run(give_up()) >= 1  # some clients really left before their answer
    assert torch.allclose(torch.tensor(assert_good(served, endpoint)), torch.tensor(expected), atol=1e-6)
    assert served.get("/health").status_code == 200
