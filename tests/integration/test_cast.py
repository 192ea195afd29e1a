"""F8: cast returns a handle whose result can be read later, by id, from another process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from poolq import AgentError, Handle, ResultTimeout
from poolq.testing import PoolFactory, RunningPool


@pytest.fixture(scope="module")
def pool(module_pools: PoolFactory, poolq_broker: str) -> Iterator[RunningPool]:
    yield module_pools.start("casts", "tests.agents:Probe", size=2, options={"redis_url": poolq_broker})


def test_cast_returns_at_once_and_the_handle_resolves(pool: RunningPool) -> None:
    handle = pool.client.cast("casts", 20, 22, op="add")
    assert isinstance(handle, Handle)
    assert handle.result(timeout=10) == 42
    assert handle.ready()
    assert handle.state == "SUCCESS"


def test_handle_resolved_by_id_from_another_process(pool: RunningPool) -> None:
    handle = pool.client.cast("casts", marker="from-afar")
    script = (
        "import json, sys, poolq\n"
        "client = poolq.Client(poolq.load_config(sys.argv[1], env={'POOLQ_BROKER_URL': sys.argv[2]}))\n"
        "print(json.dumps(client.handle(sys.argv[3]).result(timeout=10)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(pool.config.path), pool.config.broker_url, handle.id],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout)["marker"] == "from-afar"


def test_failed_cast_raises_agent_error(pool: RunningPool) -> None:
    handle = pool.client.cast("casts", "bad", op="fail")
    with pytest.raises(AgentError) as caught:
        handle.result(timeout=10)
    assert caught.value.remote_type == "ValueError"
    assert caught.value.message == "bad"
    assert "raise ValueError(message)" in caught.value.remote_traceback


def test_waiting_for_an_unfinished_cast_times_out(pool: RunningPool) -> None:
    handle = pool.client.cast("casts", sleep=2.0)
    with pytest.raises(ResultTimeout):
        handle.result(timeout=0.2)
    assert handle.result(timeout=10)["calls"] >= 1


def test_cli_cast_then_result_by_id(pool: RunningPool) -> None:
    env = {**os.environ, "POOLQ_CONFIG": str(pool.config.path), "POOLQ_BROKER_URL": pool.config.broker_url}
    cast = subprocess.run(
        [sys.executable, "-m", "poolq", "cast", "casts", "[40, 2]", "--op", "add"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    call_id = cast.stdout.strip()
    result = subprocess.run(
        [sys.executable, "-m", "poolq", "result", call_id, "--timeout", "10"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(result.stdout) == 42
    failed = subprocess.run(
        [sys.executable, "-m", "poolq", "call", "casts", '["oops"]', "--op", "fail"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert failed.returncode == 1
    assert "AgentError: ValueError: oops" in failed.stderr
    assert "raise ValueError(message)" in failed.stderr  # the remote traceback
