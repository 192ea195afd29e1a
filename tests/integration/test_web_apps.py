"""The web examples end to end: a real pool behind uvicorn (FastAPI) and Flask's server, driven by httpx."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from poolq.testing import PoolFactory, RunningPool, app_server, free_port

SERVERS = {
    "fastapi": ["-m", "uvicorn", "examples.fastapi_app:app", "--host", "127.0.0.1", "--log-level", "warning",
                "--port"],
    "flask": ["-m", "flask", "--app", "examples.flask_app", "run", "--host", "127.0.0.1", "--with-threads",
              "--port"],
}  # fmt: skip


@pytest.fixture(scope="module")
def echo(module_pools: PoolFactory) -> Iterator[RunningPool]:
    """The example echo agent; two agents and no overflow, so two busy calls fill it."""
    yield module_pools.start("echo", "workers.echo:Echo", size=2, max_overflow=0, timeout=30.0)


@pytest.fixture(scope="module", params=sorted(SERVERS))
def app(request: pytest.FixtureRequest, echo: RunningPool, module_pools: PoolFactory) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, *SERVERS[request.param], str(port)]
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
    response = httpx.get(f"{app}/pools/echo", timeout=10)
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

    slow = httpx.post(f"{app}/pools/echo/call", json={"op": "sleep", "args": [3], "call_timeout": 0.5}, timeout=10)
    assert slow.status_code == 504
    assert slow.json()["error"] == "CallTimeout"


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
    response = httpx.post(f"{app}/conversation", content=b"not json", headers={"content-type": "application/json"})
    assert response.status_code in (400, 422)
    # The server is still fine.
    assert httpx.post(f"{app}/echo", json={"text": "ok"}, timeout=10).status_code == 200


def test_examples_are_importable_without_a_broker() -> None:
    # Importing an app module must not connect anywhere (apps import at boot).
    for module in ("examples.fastapi_app", "examples.flask_app"):
        code = f"import {module}"
        done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], timeout=60)
        assert done.returncode == 0, module


def test_sync_calls_from_many_short_lived_threads(echo: RunningPool) -> None:
    # A threaded server's request threads: more of them than redis-py's pool
    # allows connections (100), each calling once and ending.
    results: dict[int, str] = {}

    def request(i: int) -> None:
        results[i] = echo.client.call("echo", text=f"t{i}")["text"]

    for start in range(0, 300, 150):
        threads = [threading.Thread(target=request, args=(i,)) for i in range(start, start + 150)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert results == {i: f"t{i}" for i in range(300)}
