"""The request timeout (BentoML's TimeoutMiddleware, as the service installs it: embed_http/clients.py) keeps its
504 and lets go of a finished request at once, on both event loops uvicorn may run."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import uvloop

from embed_http.clients import TimeoutMiddlewareReleasingTimer

REPO = Path(__file__).resolve().parent.parent

BENTOML_TIMEOUT = TimeoutMiddlewareReleasingTimer.__bases__[0]  # BentoML's own, whether or not it is installed
LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}
# What a request leaves in its context, as OpenTelemetry's middleware leaves its span there.
request_state: contextvars.ContextVar[object] = contextvars.ContextVar("request_state")


class RequestState:
    pass


async def answer_at_once(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def slow_app() -> tuple[object, list[bool]]:
    """An app that takes 30 s to answer, and the list it appends to when it is cancelled."""
    cancelled: list[bool] = []

    async def slow(scope, receive, send) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    return slow, cancelled


async def receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


async def requests_still_held(middleware_class: type, count: int) -> int:
    """Runs `count` requests through the middleware, each in a task of its own (as uvicorn does), and counts the
    requests whose context is still alive once they have all been answered."""
    middleware = middleware_class(answer_at_once, timeout=600)
    states: list[weakref.ref] = []

    async def send(message: dict) -> None:
        pass

    async def one_request() -> None:
        state = RequestState()
        states.append(weakref.ref(state))
        request_state.set(state)
        await middleware({"type": "http"}, receive, send)

    for _ in range(count):
        await asyncio.create_task(one_request())
    gc.collect()
    return sum(ref() is not None for ref in states)


@pytest.mark.parametrize("loop", LOOPS)
def test_bentomls_own_timeout_holds_every_finished_request_for_the_whole_timeout(loop):
    """Why the service replaces it: this fails once BentoML releases the timer itself (then drop the replacement)."""
    assert LOOPS[loop](requests_still_held(BENTOML_TIMEOUT, 200)) == 200


@pytest.mark.parametrize("loop", LOOPS)
def test_a_finished_request_is_let_go_at_once(loop):
    assert LOOPS[loop](requests_still_held(TimeoutMiddlewareReleasingTimer, 200)) <= 1  # the last, until its loop ends


@pytest.mark.parametrize("loop", LOOPS)
def test_a_request_past_the_timeout_gets_bentomls_504_and_its_work_is_cancelled(loop):
    slow, cancelled = slow_app()

    async def scenario() -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        await TimeoutMiddlewareReleasingTimer(slow, timeout=0.05)({"type": "http"}, receive, send)
        await asyncio.sleep(0)
        return sent

    sent = LOOPS[loop](scenario())
    assert sent[0]["status"] == 504
    assert json.loads(sent[1]["body"]) == {"error": "Not able to process the request in 0.05 seconds"}
    assert cancelled == [True]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_request_whose_task_is_cancelled_cancels_its_work_too(loop):
    """A client that hangs up: uvicorn's task for the request is cancelled (embed_http/clients.py), and the app's
    own task with it, not left to compute for nobody."""
    slow, cancelled = slow_app()

    async def scenario() -> list[bool]:
        async def send(message: dict) -> None:
            pass

        request = asyncio.create_task(
            TimeoutMiddlewareReleasingTimer(slow, timeout=600)({"type": "http"}, receive, send)
        )
        await asyncio.sleep(0.05)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.sleep(0)
        return list(cancelled)  # before the loop's end cancels whatever is left

    assert LOOPS[loop](scenario()) == [True]


def test_a_serving_worker_builds_its_timeout_from_the_releasing_class():
    """In a fresh interpreter: a worker's start_serving() (service.py) installs the class; importing alone does not."""
    script = (
        "from bentoml._internal.server.http import traffic; import service; before = traffic.TimeoutMiddleware; "
        "service.start_serving(); print(before.__name__, traffic.TimeoutMiddleware.__name__)"
    )
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    assert found.stdout.split()[-2:] == ["TimeoutMiddleware", TimeoutMiddlewareReleasingTimer.__name__]


def test_a_serving_worker_shortens_the_gil_switch_interval():
    """In a fresh interpreter (start_serving() sets it for the whole worker process): below Python's 5 ms, so
    that a busy event loop does not hold the model's thread back at every torch operation (BENCHMARKS.md)."""
    script = (
        "import sys; default = sys.getswitchinterval(); import service; service.start_serving(); "
        "print(default, sys.getswitchinterval())"
    )
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    default, serving = map(float, found.stdout.split()[-2:])
    assert default == 0.005 and serving <= 0.001
