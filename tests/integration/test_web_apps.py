"""The web examples end to end: a real pool behind uvicorn (FastAPI) and Flask's server, driven by httpx."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request

import poolq
from examples import APPS, fastapi_app, flask_app, server_argv
from poolq.testing import PoolFactory, RunningPool, app_server, free_port

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def echo(module_pools: PoolFactory) -> Iterator[RunningPool]:
    """The example echo agent; two agents and no overflow, so two busy calls fill it."""
    yield module_pools.start("echo", "workers.echo:Echo", size=2, max_overflow=0, timeout=30.0)


@pytest.fixture(scope="module", params=APPS)
def app(request: pytest.FixtureRequest, echo: RunningPool, module_pools: PoolFactory) -> Iterator[str]:
    port = free_port()
    argv = server_argv(request.param, port)
    log = module_pools.directory / f"{request.param}.log"
    with app_server(argv, port, module_pools.environment(echo), log) as url:
        yield url


def test_echo(app: str) -> None:
    response = httpx.post(f"{app}/echo", json={"text": "hi"}, timeout=10)
    assert response.status_code == 200
    assert response.json()["text"] == "hi"
    assert response.json()["agent"]


def test_any_operation_of_a_pool(app: str) -> None:
    response = httpx.post(f"{app}/pools/echo/call", json={"op": "upper", "args": ["shout"]}, timeout=10)
    assert response.status_code == 200
    assert response.json() == {"result": "SHOUT"}


def test_a_conversation_stays_on_one_agent(app: str) -> None:
    response = httpx.post(f"{app}/conversation", json={"messages": ["a", "b", "c"]}, timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert [reply["text"] for reply in body["replies"]] == ["a", "b", "c"]
    assert {reply["agent"] for reply in body["replies"]} == {body["agent"]}
    # The agent's own count: three calls in a row on the same warm agent.
    served = [reply["served"] for reply in body["replies"]]
    assert served == list(range(served[0], served[0] + 3))


def test_status(app: str) -> None:
    response = httpx.get(f"{app}/pools/echo/status", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["pool"] == "echo"
    assert body["size"] == 2
    assert len(body["agents"]) == 2


def test_errors_map_to_status_codes(app: str) -> None:
    unknown = httpx.post(f"{app}/pools/nope/call", json={}, timeout=10)
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "UnknownPool"

    no_op = httpx.post(f"{app}/pools/echo/call", json={"op": "nope"}, timeout=10)
    assert no_op.status_code == 422
    assert no_op.json()["error"] == "UnknownOperation"

    raised = httpx.post(f"{app}/pools/echo/call", json={"op": "upper", "args": [5]}, timeout=10)
    assert raised.status_code == 502
    assert raised.json()["error"] == "AgentError"
    assert raised.json()["remote_type"] == "AttributeError"

    # NaN parses as JSON in both frameworks, but it is not plain JSON to poolq
    nan = httpx.post(f"{app}/pools/echo/call", content=b'{"args": [NaN]}', headers=JSON, timeout=10)
    assert nan.status_code == 422
    assert nan.json()["error"] == "InvalidPayload"

    slow = httpx.post(f"{app}/pools/echo/call", json={"op": "sleep", "args": [3], "call_timeout": 0.5}, timeout=10)
    assert slow.status_code == 504
    assert slow.json()["error"] == "CallTimeout"


#: Every error poolq raises and its answer; PoolDegraded, CallTimeout and
#: AgentCrashed are subclasses the examples find along the error's classes.
ERRORS = [
    (poolq.UnknownPool("nope"), 404),
    (poolq.InvalidPayload("too big"), 422),
    (poolq.UnknownOperation("nope"), 422),
    (poolq.InvalidArguments("missing text"), 422),
    (poolq.PoolExhausted("full"), 503),
    (poolq.AgentUnavailable("setup failed"), 503),
    (poolq.PoolDegraded("setups keep failing"), 503),
    (poolq.LeaseLost("expired"), 503),
    (poolq.BrokerUnavailable("down"), 503),
    (poolq.CheckoutTimeout("no agent"), 504),
    (poolq.CallTimeout("too slow"), 504),
    (poolq.AgentError("ValueError", "bad input"), 502),
    (poolq.AgentCrashed("WorkerLostError", "killed"), 502),
    (poolq.ConfigError("not for requests"), 500),
]


@pytest.mark.parametrize(("error", "status"), ERRORS, ids=[type(error).__name__ for error, _ in ERRORS])
def test_every_error_has_its_status_code(error: poolq.PoolqError, status: int) -> None:
    fastapi = asyncio.run(fastapi_app.poolq_error(Request({"type": "http"}), error))
    with flask_app.app.app_context():
        flask, flask_status, flask_headers = flask_app.poolq_error(error)

    assert fastapi.status_code == flask_status == status
    assert json.loads(fastapi.body) == flask.get_json()
    assert flask.get_json()["error"] == type(error).__name__
    retry = "1" if status == 503 else None
    assert fastapi.headers.get("retry-after") == flask_headers.get("Retry-After") == retry
    if isinstance(error, poolq.AgentError):
        assert flask.get_json()["remote_type"] == error.remote_type


def test_a_full_pool_answers_503_or_504(app: str, echo: RunningPool) -> None:
    # Given both agents are busy for 2 s
    busy = [echo.client.cast("echo", 2.0, op="sleep") for _ in range(2)]
    echo.wait_for(lambda: echo.client.status("echo").in_use == 2, timeout=10, what="both agents busy")

    # A caller that will not wait hears 503 (with Retry-After) at once
    refused = httpx.post(f"{app}/pools/echo/call", json={"args": [], "block": False}, timeout=10)
    assert refused.status_code == 503
    assert refused.json()["error"] == "PoolExhausted"
    assert refused.headers["retry-after"] == "1"

    # A caller that waits 0.3 s for an agent hears 504
    late = httpx.post(f"{app}/pools/echo/call", json={"timeout": 0.3}, timeout=10)
    assert late.status_code == 504
    assert late.json()["error"] == "CheckoutTimeout"

    assert [handle.result(timeout=10) for handle in busy] == [2.0, 2.0]


def test_200_concurrent_requests(app: str) -> None:
    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=app, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(client.post("/echo", json={"text": f"m{i}"}) for i in range(200)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 200, Counter((r.status_code, r.text[:60]) for r in responses)
    assert [r.json()["text"] for r in responses] == [f"m{i}" for i in range(200)]


def test_bad_request_bodies_are_refused_before_any_call(app: str) -> None:
    response = httpx.post(f"{app}/conversation", content=b"not json", headers=JSON, timeout=10)
    assert response.status_code in (400, 422)
    # The server is still fine.
    assert httpx.post(f"{app}/echo", json={"text": "ok"}, timeout=10).status_code == 200


def test_examples_are_importable_without_a_broker() -> None:
    # Importing an app module must not connect anywhere (apps import at boot).
    for module in ("examples.fastapi_app", "examples.flask_app"):
        code = f"import {module}"
        done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], timeout=60)
        assert done.returncode == 0, module


def test_a_burst_from_many_threads(app: str) -> None:
    # Flask's threaded server runs each request in a new short-lived thread:
    # more of them than redis-py's pool allows connections (100), each calling once.
    results: dict[int, tuple[int, str]] = {}

    with httpx.Client(base_url=app, timeout=60, limits=httpx.Limits(max_connections=150)) as client:

        def request(i: int) -> None:
            response = client.post("/echo", json={"text": f"t{i}"})
            results[i] = (response.status_code, response.json().get("text", response.text))

        for start in range(0, 300, 150):
            threads = [threading.Thread(target=request, args=(i,)) for i in range(start, start + 150)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
    assert results == {i: (200, f"t{i}") for i in range(300)}


def test_status_from_200_threads_at_once(echo: RunningPool) -> None:
    # More threads than the state client pools connections (100): they queue, none fails.
    barrier = threading.Barrier(200)
    sizes: list[int] = []
    errors: list[BaseException] = []

    def read() -> None:
        barrier.wait(timeout=30)
        try:
            sizes.append(echo.client.status("echo").size)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sizes == [2] * 200
