"""F2: the agent lifecycle fires at its documented moments in every supported execution pool."""

from __future__ import annotations

import time

import pytest
import redis

from poolq import AgentUnavailable
from poolq.testing import PoolFactory
from tests.agents import clear, events


def test_agents_are_warm_before_the_first_call(poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis) -> None:
    clear(state, "warmfirst")
    pool = poolq_pools.start("warmfirst", "tests.agents:Probe", size=2, options={"redis_url": poolq_broker})
    # Nothing was sent yet, and both agents are set up and idle
    assert len(events(state, "warmfirst", "setup")) == 2
    assert sorted(a.state for a in pool.agents()) == ["idle", "idle"]
    assert all(a.requests == 0 for a in pool.agents())


def test_setup_longer_than_celerys_process_start_timeout(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    # Celery kills a prefork child that is not up within 4 s by default; this one needs 10 s
    clear(state, "slowsetup")
    pool = poolq_pools.start(
        "slowsetup", "tests.agents:Probe", size=1, options={"redis_url": poolq_broker, "setup_seconds": 10}
    )
    assert pool.client.call("slowsetup", marker="m")["marker"] == "m"
    assert len(events(state, "slowsetup", "setup")) == 1  # built once, never killed and respawned


def test_prefork_tears_every_agent_down_on_shutdown(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "prefork")
    pool = poolq_pools.start("prefork", "tests.agents:Probe", size=2, options={"redis_url": poolq_broker})
    setup_pids = sorted(pid for _, pid, _ in events(state, "prefork", "setup"))
    assert pool.workers[0].stop() == 0
    assert sorted(pid for _, pid, _ in events(state, "prefork", "teardown")) == setup_pids
    assert pool.agents() == []


def test_threads_pool_builds_one_agent_per_thread(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "threads")
    pool = poolq_pools.start(
        "threads", "tests.agents:Probe", size=3, worker_pool="threads", options={"redis_url": poolq_broker}
    )
    setups = events(state, "threads", "setup")
    assert len(setups) == 3
    assert len({pid for _, pid, _ in setups}) == 1  # one process
    assert len({name for _, _, name in setups}) == 3  # three agents

    # Three slow calls run at once, each on its own agent
    started = time.monotonic()
    handles = [pool.client.cast("threads", sleep=1.0) for _ in range(3)]
    agents = {h.result(timeout=10)["agent"] for h in handles}
    assert len(agents) == 3
    assert time.monotonic() - started < 2.5

    assert pool.workers[0].stop() == 0
    assert len(events(state, "threads", "teardown")) == 3


def test_solo_pool(poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis) -> None:
    clear(state, "solo")
    pool = poolq_pools.start(
        "solo", "tests.agents:Probe", size=1, worker_pool="solo", options={"redis_url": poolq_broker}
    )
    answer = pool.client.call("solo", marker="s")
    assert answer["pid"] == pool.workers[0].pid  # the agent lives in the worker's own process
    assert pool.workers[0].stop() == 0
    assert [kind for kind, _, _ in events(state, "solo")] == ["setup", "teardown"]


def test_failed_setup_keeps_the_process_and_fails_calls_fast(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "badsetup")
    pool = poolq_pools.start(
        "badsetup", "tests.agents:Probe", size=1, options={"redis_url": poolq_broker, "fail_setup": True}
    )
    [agent] = pool.agents()
    assert agent.state == "failed"
    assert "setup failed on purpose" in agent.error
    with pytest.raises(AgentUnavailable, match="setup failed on purpose"):
        pool.client.call("badsetup", timeout=5)
    # The process was not killed and respawned in a loop
    assert pool.workers[0].process.poll() is None
    assert len(events(state, "badsetup", "setup_failed")) <= 2
