"""F12, F13, F27: status and counters agree with what runs, across worker nodes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from poolq import AgentError
from poolq.store import names
from poolq.testing import PoolFactory


@contextmanager
def count_commands(client: redis.Redis) -> Iterator[list[str]]:
    """The Redis commands ``client`` sends inside the block."""
    sent: list[str] = []
    original = client.execute_command

    def counting(*args: object, **options: object) -> object:
        sent.append(str(args[0]))
        return original(*args, **options)

    client.execute_command = counting  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        del client.execute_command


def test_counters_and_agents_are_exact_after_a_scripted_run(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    pool = poolq_pools.start("counted", "tests.agents:Probe", size=2, options={"redis_url": poolq_broker})
    # Given 10 good calls and one that fails
    for i in range(10):
        pool.client.call("counted", marker=str(i))
    with pytest.raises(AgentError):
        pool.client.call("counted", "x", op="fail")

    status = pool.client.status("counted")
    assert (status.state, status.size, status.available, status.in_use, status.overflow) == ("ready", 2, 2, 0, 0)
    assert (status.max_overflow, status.waiting) == (0, 0)
    assert status.counters["requests"] == 11
    assert status.counters["spawned"] == 2
    assert status.counters["recycles"] == status.counters["terminated"] == 0
    assert sum(agent.requests for agent in status.agents) == 11
    assert all(agent.state == "idle" and agent.idle_s is not None for agent in status.agents)
    assert [n.id for n in status.nodes] == [pool.workers[0].node]


def test_busy_agents_make_the_pool_full(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start("busy", "tests.agents:Probe", size=2, options={"redis_url": poolq_broker})
    handles = [pool.client.cast("busy", sleep=1.5) for _ in range(3)]
    pool.wait_for(lambda: pool.client.status("busy").in_use == 2, timeout=10, what="both agents busy")
    status = pool.client.status("busy")
    assert (status.state, status.available, status.in_use, status.waiting) == ("full", 0, 2, 1)
    for handle in handles:
        handle.result(timeout=10)
    assert pool.client.status("busy").state == "ready"


def test_two_nodes_show_as_one_pool(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start("twonodes", "tests.agents:Probe", size=2, nodes=2, options={"redis_url": poolq_broker})
    status = pool.client.status("twonodes")
    assert status.size == 4 and status.available == 4
    assert sorted(n.id for n in status.nodes) == sorted(w.node for w in pool.workers)
    assert len({a.name for a in status.agents}) == 4  # unique names across nodes
    # Calls spread over both nodes' processes
    handles = [pool.client.cast("twonodes", sleep=0.5) for _ in range(4)]
    pids = {h.result(timeout=10)["pid"] for h in handles}
    assert len(pids) == 4


def test_agent_names_are_looked_up_by_host_and_pid(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start("named", "tests.agents:Probe", size=2, options={"redis_url": poolq_broker})
    for agent in pool.client.status("named").agents:
        assert names.lookup(pool.client.state, agent.host, agent.pid) == agent.name
        assert agent.name.count("-") >= 1
    answer = pool.client.call("named")
    assert answer["agent"] in {a.name for a in pool.client.status("named").agents}  # the agent knows its name
    # Celery's log lines from the agent's process carry its name
    line = f"/{answer['agent']}] Task poolq.named.handle["  # the call's name in logs: poolq.<pool>.<op>
    pool.wait_for(lambda: line in pool.workers[0].log(), timeout=5, what="log line")


def test_status_command(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start("shown", "tests.agents:Probe", size=1, options={"redis_url": poolq_broker})
    env = {**os.environ, "POOLQ_CONFIG": str(pool.config.path), "POOLQ_BROKER_URL": poolq_broker}
    table = subprocess.run(
        [sys.executable, "-m", "poolq", "status", "shown"], env=env, capture_output=True, text=True, check=True
    ).stdout
    [agent] = pool.client.status("shown").agents
    assert "pool shown: ready" in table and agent.name in table
    as_json = subprocess.run(
        [sys.executable, "-m", "poolq", "status", "--json"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(as_json)[0]["agents"][0]["name"] == agent.name


def test_status_costs_one_round_trip_whatever_the_agent_count(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    small = poolq_pools.start(
        "few", "tests.agents:Probe", size=2, worker_pool="threads", options={"redis_url": poolq_broker}
    )
    large = poolq_pools.start(
        "many", "tests.agents:Probe", size=20, worker_pool="threads", options={"redis_url": poolq_broker}
    )
    for pool, name in ((small, "few"), (large, "many")):
        pool.client.status(name)  # scripts loaded, connection open
        with count_commands(pool.client.state) as sent:
            status = pool.client.status(name)
        assert len(status.agents) == (2 if name == "few" else 20)
        assert len(sent) == 1, sent

    timings = []
    for _ in range(200):
        started = time.perf_counter()
        large.client.status("many")
        timings.append(time.perf_counter() - started)
    print(f"\nstatus() with 20 agents: p50 {statistics.median(timings) * 1000:.2f}ms")


def test_agent_names_are_celery_worker_metadata(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start("inspected", "tests.agents:Probe", size=2, options={"redis_url": poolq_broker})
    node = pool.workers[0].node
    stats = pool.client.app.control.inspect(destination=[node], timeout=5).stats()
    agents = stats[node]["poolq"]["agents"]
    assert set(agents) == {a.name for a in pool.client.status("inspected").agents}
    assert all(info["state"] == "idle" for info in agents.values())
