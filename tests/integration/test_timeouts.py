"""F7: ``timeout`` bounds the wait for an agent (and the call never runs late);
``call_timeout`` bounds the run."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from poolq import CallTimeout, CheckoutTimeout
from poolq.testing import PoolFactory, RunningPool
from tests.agents import clear, events, ran


@pytest.fixture(scope="module")
def single(module_pools: PoolFactory, poolq_broker: str) -> Iterator[RunningPool]:
    """A pool of exactly one agent, so one long call leaves no agent free."""
    yield module_pools.start("single", "tests.agents:Probe", size=1, options={"redis_url": poolq_broker})


def test_checkout_timeout_when_no_agent_is_free_and_the_call_never_runs(
    single: RunningPool, state: redis.Redis
) -> None:
    clear(state, "single")
    # Given the only agent is busy for 2 s
    busy = single.client.cast("single", marker="busy", sleep=2.0)
    single.wait_for(lambda: ran(state, "single") == ["busy"], timeout=10, what="busy call started")

    # When a call may wait only 0.5 s for an agent
    started = time.monotonic()
    with pytest.raises(CheckoutTimeout):
        single.client.call("single", marker="late", timeout=0.5)
    waited = time.monotonic() - started

    # Then it fails after about its timeout, not after the busy call
    assert 0.5 <= waited < 1.9
    assert busy.result(timeout=10)["marker"] == "busy"
    # And once the agent is free again, the abandoned call is dropped, not run
    single.wait_for(lambda: single.client.state.llen("poolq.single") == 0, timeout=10, what="queue drained")
    after = single.client.call("single", marker="after")
    assert after["marker"] == "after"
    assert ran(state, "single") == ["busy", "after"]


def test_call_timeout_interrupts_the_call_and_replaces_the_agent(single: RunningPool, state: redis.Redis) -> None:
    _assert_call_timeout_replaces_the_agent(single, state)


def test_timeouts_must_be_positive(single: RunningPool) -> None:
    with pytest.raises(ValueError, match="timeout"):
        single.client.call("single", timeout=0)
    with pytest.raises(ValueError, match="call_timeout"):
        single.client.call("single", call_timeout=-1)


def test_call_timeout_on_a_solo_node(module_pools: PoolFactory, poolq_broker: str, state: redis.Redis) -> None:
    # Celery enforces no time limit in a solo pool: poolq's own alarm does.
    solo = module_pools.start(
        "solo", "tests.agents:Probe", size=1, worker_pool="solo", options={"redis_url": poolq_broker}
    )
    _assert_call_timeout_replaces_the_agent(solo, state)


def _assert_call_timeout_replaces_the_agent(pool: RunningPool, state: redis.Redis) -> None:
    clear(state, pool.name)
    started = time.monotonic()
    with pytest.raises(CallTimeout):
        pool.client.call(pool.name, sleep=5.0, call_timeout=0.5)
    assert time.monotonic() - started < 3.0
    # The interrupted agent is torn down and a fresh one set up (after the reply
    # went out, while the process takes no work)
    pool.wait_for(lambda: len(events(state, pool.name)) == 2, timeout=10, what="agent replaced")
    assert [kind for kind, _, _ in events(state, pool.name)] == ["teardown", "setup"]
    assert pool.client.call(pool.name, marker="next")["calls"] == 1
