"""F10: a lease holds one agent for several calls, exclusively, and gives it back clean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from poolq import AgentError, CallTimeout, CheckoutTimeout, InvalidOption, LeaseLost, PoolExhausted
from poolq.store.registry import HEARTBEAT_TTL
from poolq.testing import PoolFactory, RunningPool
from tests.agents import clear, events


@pytest.fixture(scope="module")
def pool(module_pools: PoolFactory, poolq_broker: str) -> Iterator[RunningPool]:
    yield module_pools.start("leased", "tests.agents:Probe", size=2, options={"redis_url": poolq_broker})


@pytest.fixture(autouse=True)
def clean(state: redis.Redis, pool: RunningPool) -> None:
    pool.wait_for(lambda: pool.client.status("leased").available == 2, timeout=15, what="both agents idle")
    clear(state, "leased")


def test_every_call_of_a_lease_runs_on_the_same_agent(pool: RunningPool, state: redis.Redis) -> None:
    with pool.client.lease("leased", timeout=5, ttl=10) as agent:
        answers = [agent.call(marker=str(i)) for i in range(5)]
        assert len({a["agent"] for a in answers}) == 1
        assert [a["calls"] for a in answers] == [1, 2, 3, 4, 5]  # the agent's own state carries over
        status = pool.client.status("leased")
        assert (status.in_use, status.available) == (1, 1)
        assert [a.state for a in status.agents if a.name == agent.agent_name] == ["leased"]
        assert agent.call(2, 3, op="add") == 5
        with pytest.raises(AgentError):
            agent.call("inside a lease", op="fail")
    # Released: reset() ran on that agent before anyone else could have it
    pool.wait_for(lambda: events(state, "leased", "reset") != [], timeout=5, what="reset")
    assert [name for _, _, name in events(state, "leased", "reset")] == [agent.agent_name]


def test_leases_are_exclusive_and_a_third_waits_or_fails(pool: RunningPool) -> None:
    held: list[str] = []
    release = threading.Event()

    def hold() -> None:
        with pool.client.lease("leased", timeout=5, ttl=10) as agent:
            held.append(agent.call()["agent"])
            release.wait(10)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
    pool.wait_for(lambda: len(held) == 2, timeout=10, what="two leases")
    assert len(set(held)) == 2  # two leases never share an agent

    started = time.monotonic()
    with pytest.raises(PoolExhausted):
        pool.client.lease("leased", block=False).acquire()
    assert time.monotonic() - started < 0.05
    with pytest.raises(CheckoutTimeout):
        pool.client.lease("leased", timeout=0.5).acquire()
    with pytest.raises(PoolExhausted):
        pool.client.call("leased", block=False)

    release.set()
    for thread in holders:
        thread.join(10)
    with pool.client.lease("leased", timeout=5) as third:
        assert third.call()["agent"] in held


def test_broken_release_recycles_the_agent(pool: RunningPool, state: redis.Redis) -> None:
    lease = pool.client.lease("leased", timeout=5, ttl=10).acquire()
    name = lease.agent_name
    lease.call(marker="dirty")
    lease.release(broken=True)
    pool.wait_for(lambda: len(events(state, "leased")) >= 2, timeout=10, what="recycle")
    (teardown, _, old), (setup, _, new) = events(state, "leased")
    assert (teardown, old, setup) == ("teardown", name, "setup")
    assert new != name  # a recycled agent is a new agent, with a new name
    assert pool.client.status("leased").counters["recycles"] >= 1


def test_a_call_timeout_ends_the_lease_and_recycles_the_agent(pool: RunningPool, state: redis.Redis) -> None:
    lease = pool.client.lease("leased", timeout=5, ttl=10).acquire()
    with pytest.raises(CallTimeout):
        lease.call(sleep=5, call_timeout=0.5)
    with pytest.raises(LeaseLost):
        lease.call()
    pool.wait_for(lambda: len(events(state, "leased")) >= 2, timeout=10, what="recycle")
    assert [kind for kind, _, _ in events(state, "leased")] == ["teardown", "setup"]


def test_a_call_after_the_lease_expired_is_lease_lost(pool: RunningPool) -> None:
    # Given a lease whose client stays silent past its ttl
    lease = pool.client.lease("leased", timeout=5, ttl=1).acquire()
    agent = lease.call()["agent"]
    pool.wait_for(
        lambda: all(a.state != "leased" for a in pool.client.status("leased").agents if a.name == agent),
        timeout=10, what="the lease expired",
    )  # fmt: skip
    # When it calls again, Then it hears that the lease ended (a typed error, not an unreadable reply)
    with pytest.raises(LeaseLost, match="expired"):
        lease.call(call_timeout=5)


def test_a_lease_call_refuses_the_leases_own_options(pool: RunningPool) -> None:
    with pool.client.lease("leased", timeout=5, ttl=10) as agent:
        for option in ({"timeout": 3}, {"block": False}):
            with pytest.raises(InvalidOption, match="a lease's call takes op and call_timeout"):
                agent.call(**option)
        assert agent.call(marker="own")["marker"] == "own"  # the lease goes on


def test_a_dead_clients_lease_frees_the_agent_within_its_ttl(pool: RunningPool, state: redis.Redis) -> None:
    ttl = 2.0
    script = (
        "import json, sys, time, poolq\n"
        "client = poolq.Client(poolq.load_config(sys.argv[1], env={'POOLQ_BROKER_URL': sys.argv[2]}))\n"
        "lease = client.lease('leased', timeout=5, ttl=float(sys.argv[3])).acquire()\n"
        "print(json.dumps(lease.call()), flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(pool.config.path), pool.config.broker_url, str(ttl)],
        stdout=subprocess.PIPE,
        text=True,
    ) as client:
        try:
            assert client.stdout is not None
            agent = json.loads(client.stdout.readline())["agent"]
            [slot] = [a.id for a in pool.client.status("leased").agents if a.name == agent]
            os.kill(client.pid, signal.SIGKILL)
            killed = time.monotonic()
        finally:
            client.kill()
    pool.wait_for(
        lambda: any(a.id == slot and a.state == "idle" for a in pool.client.status("leased").agents),
        timeout=ttl + HEARTBEAT_TTL + 10,
        what="the agent back",
    )
    freed_after = time.monotonic() - killed
    print(f"\nlease of a killed client freed after {freed_after:.2f}s (ttl {ttl}s)")
    assert freed_after < ttl + HEARTBEAT_TTL
    assert ("teardown", agent) in [(kind, who) for kind, _, who in events(state, "leased")]  # expired: recycled


def test_lease_calls_are_faster_than_plain_calls(pool: RunningPool) -> None:
    n = 200
    started = time.perf_counter()
    for _ in range(n):
        pool.client.call("leased")
    plain = (time.perf_counter() - started) / n
    with pool.client.lease("leased", timeout=5) as agent:
        started = time.perf_counter()
        for _ in range(n):
            agent.call()
        leased = (time.perf_counter() - started) / n
    print(f"\nround trip: plain call {plain * 1000:.2f}ms, lease call {leased * 1000:.2f}ms")
