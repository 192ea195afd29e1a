"""Bad input and agent failures: a typed error at the caller, and the worker serves on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from poolq import AgentError, InvalidArguments, InvalidPayload, UnknownOperation, UnknownPool
from poolq.testing import PoolFactory, RunningPool
from tests.agents import clear, events


@pytest.fixture(scope="module")
def pool(module_pools: PoolFactory, poolq_broker: str) -> Iterator[RunningPool]:
    yield module_pools.start(
        "errors", "tests.agents:Probe", size=1, max_payload_bytes=2048, options={"redis_url": poolq_broker}
    )


def test_agent_exception_reaches_the_caller_with_type_message_and_traceback(pool: RunningPool) -> None:
    with pytest.raises(AgentError) as caught:
        pool.client.call("errors", "boom", op="fail")
    assert caught.value.remote_type == "ValueError"
    assert caught.value.message == "boom"
    assert "in fail" in caught.value.remote_traceback
    assert "raise ValueError(message)" in caught.value.remote_traceback


def test_an_agent_that_raised_stays_unless_unhealthy(pool: RunningPool, state: redis.Redis) -> None:
    clear(state, "errors")
    # A failure that leaves the agent healthy: the same agent serves on
    before = pool.client.call("errors")["calls"]
    with pytest.raises(AgentError):
        pool.client.call("errors", "still fine", op="fail")
    assert pool.client.call("errors")["calls"] == before + 1
    assert events(state, "errors") == []
    # A failure after which healthy() says no: the agent is replaced
    with pytest.raises(AgentError):
        pool.client.call("errors", "broken now", op="fail", break_agent=True)
    pool.wait_for(lambda: len(events(state, "errors")) == 2, timeout=10, what="agent replaced")
    assert [kind for kind, _, _ in events(state, "errors")] == ["teardown", "setup"]
    assert pool.client.call("errors")["calls"] == 1


def test_unknown_operation(pool: RunningPool) -> None:
    with pytest.raises(UnknownOperation, match="no operation 'nope'"):
        pool.client.call("errors", op="nope")


def test_arguments_that_do_not_fit_the_signature(pool: RunningPool) -> None:
    with pytest.raises(InvalidArguments, match="add"):
        pool.client.call("errors", 1, op="add")
    with pytest.raises(InvalidArguments):
        pool.client.call("errors", unexpected=True)


def test_result_that_is_not_json(pool: RunningPool) -> None:
    with pytest.raises(AgentError, match="not plain JSON") as caught:
        pool.client.call("errors", op="bad_result")
    assert caught.value.remote_type == "TypeError"


@pytest.mark.parametrize("payload", [{"marker": {1, 2}}, {"marker": object()}, {"sleep": float("nan")}])
def test_payload_that_is_not_json_is_refused_before_sending(pool: RunningPool, payload: dict[str, object]) -> None:
    with pytest.raises(InvalidPayload, match="not plain JSON"):
        pool.client.call("errors", **payload)


def test_payload_over_the_size_limit_is_refused(pool: RunningPool) -> None:
    with pytest.raises(InvalidPayload, match="over the limit of 2048"):
        pool.client.call("errors", marker="x" * 4096)


def test_unknown_pool(pool: RunningPool) -> None:
    with pytest.raises(UnknownPool, match="no pool named 'nope'"):
        pool.client.call("nope")


def test_the_worker_still_serves_after_every_error(pool: RunningPool) -> None:
    assert pool.client.call("errors", 2, 3, op="add") == 5
    assert all(worker.process.poll() is None for worker in pool.workers)
    assert [a.state for a in pool.agents()] == ["idle"]
