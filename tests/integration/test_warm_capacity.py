"""Warm capacity is a promise: recycling never empties a pool; status and bounds tell the truth (F15, F17, F31, F32).

With a 1 s setup (what recycling is about), agents that reach their limits
under load are replaced warm first: a new process sets up while the old agent
serves on, and only then does the old one leave, one at a time per node.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import redis

from poolq import PoolClosed
from poolq.testing import PoolFactory, RunningPool
from tests.agents import clear

SERVING = ("idle", "busy", "leased")
#: Calls of 0.1 s, from two threads, in the recycling test.
CALLS = 120


def _serving(pool: RunningPool) -> int:
    return sum(1 for a in pool.client.status(pool.name).agents if a.state in SERVING)


def test_recycling_under_load_never_takes_warm_capacity_away(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "warm")
    pool = poolq_pools.start(
        "warm", "tests.agents:Probe", size=2, max_requests=10, recycle_jitter=0.1,
        options={"redis_url": poolq_broker, "setup_seconds": 1.0},
    )  # fmt: skip
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_serving(pool))
            time.sleep(0.02)

    def load(part: int) -> None:
        for i in range(part, CALLS, 2):
            pool.client.call("warm", f"m{i}", 0.1, op="work", timeout=30)

    sampler = threading.Thread(target=sample)
    sampler.start()
    callers = [threading.Thread(target=load, args=(part,)) for part in range(2)]
    started = time.monotonic()
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(120)
    elapsed = time.monotonic() - started
    done.set()
    sampler.join(10)

    recycles = pool.client.status("warm").counters["recycles"]
    distribution = dict(sorted(Counter(samples).items()))
    print(f"\nwarm agents, {len(samples)} samples during {CALLS} calls: {distribution}; {recycles} recycles")
    assert recycles >= 3  # agents did reach their limits and were replaced
    assert min(samples) >= 2  # never fewer warm agents than the pool's size
    assert elapsed < CALLS * 0.1 / 2 + 3  # and no call waited for a cold start


def test_status_agrees_with_maintenance_scaling_on_two_nodes(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start(
        "scaled", "tests.agents:Probe", size=1, min_size=1, max_size=3, maintenance_interval=1.0, idle_timeout=3.0,
        nodes=2, options={"redis_url": poolq_broker},
    )  # fmt: skip
    poolq_pools.start_maintenance(pool)
    handles = [pool.client.cast("scaled", f"m{i}", 0.3, op="work") for i in range(30)]
    # When maintenance scales each node from 1 to 3 agents
    pool.wait_for(lambda: _serving(pool) == 6, timeout=30, what="scaled up to 3 per node")
    for handle in handles:
        handle.result(timeout=60)
    pool.wait_for(lambda: pool.client.status("scaled").available == 6, timeout=10, what="idle")
    # Then the status counts them as the pool's size, not as overflow
    status = pool.client.status("scaled")
    assert (status.size, status.overflow, status.max_overflow, status.state) == (6, 0, 0, "ready")
    assert [n.size for n in status.nodes] == [3, 3]
    # And after scaling down, likewise
    pool.wait_for(lambda: _serving(pool) == 2, timeout=40, what="scaled back down")
    status = pool.client.status("scaled")
    assert (status.size, status.overflow, status.state) == (2, 0, "ready")
    assert [n.size for n in status.nodes] == [1, 1]


def test_remote_control_cannot_push_a_pool_past_its_bounds(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start(
        "bounded", "tests.agents:Probe", size=1, max_overflow=1, options={"redis_url": poolq_broker}
    )
    node = pool.workers[0].node
    control = pool.client.app.control
    # Flower's Grow button: up to size + max_overflow, and no further
    [reply] = control.pool_grow(2, destination=[node], reply=True)
    assert "1 -> 2" in reply[node]["ok"]
    [reply] = control.pool_grow(1, destination=[node], reply=True)
    assert "bound is base 1 + max_overflow 1" in reply[node]["error"]
    pool.wait_for(lambda: _serving(pool) == 2, timeout=10, what="grown by one")
    # Shrink: not below the base size
    [reply] = control.pool_shrink(5, destination=[node], reply=True)
    assert "2 -> 1" in reply[node]["ok"]
    pool.wait_for(lambda: _serving(pool) == 1, timeout=10, what="back to its size")
    [reply] = control.pool_shrink(1, destination=[node], reply=True)
    assert "error" in reply[node]
    status = pool.client.status("bounded")
    assert status.overflow <= status.max_overflow


def test_a_slot_recycled_max_recycles_times_is_degraded_not_recycled_forever(
    poolq_pools: PoolFactory, poolq_broker: str
) -> None:
    pool = poolq_pools.start(
        "capped", "tests.agents:Probe", size=1, max_requests=2, recycle_jitter=0, max_recycles=2,
        options={"redis_url": poolq_broker},
    )  # fmt: skip
    for i in range(12):
        pool.client.call("capped", marker=str(i))
        time.sleep(0.1)

    def degraded() -> bool:
        return any(a.degraded for a in pool.client.status("capped").agents)

    pool.wait_for(degraded, timeout=20, what="slot degraded")
    [agent] = [a for a in pool.client.status("capped").agents if a.degraded]
    assert agent.recycles == 2 and "max_recycles 2" in agent.degraded
    assert pool.client.status("capped").counters["recycles"] == 2
    # The history shows what the slot went through
    assert "degraded" in [state for _, state in agent.history]
    assert pool.client.call("capped", marker="still")["marker"] == "still"  # a limit reached: it still serves


def test_sustained_cpu_over_max_cpu_percent_replaces_the_agent(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start(
        "hot", "tests.agents:Probe", size=1, max_cpu_percent=25, cpu_window=2, options={"redis_url": poolq_broker}
    )
    first = pool.client.call("hot")["pid"]
    pool.client.call("hot", 3.0, op="burn")  # a core busy for longer than the window (25 %: a loaded CI machine)
    pool.wait_for(lambda: first not in {a.pid for a in pool.client.status("hot").agents}, timeout=20, what="replaced")
    assert pool.client.status("hot").counters["recycles"] == 1
    assert pool.client.call("hot")["pid"] != first


def test_a_pool_stopped_on_purpose_refuses_calls_at_once(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start("closing", "tests.agents:Probe", size=1, options={"redis_url": poolq_broker})
    pool.client.stop("closing", timeout=30)
    pool.workers.pop().stop()
    started = time.monotonic()
    with pytest.raises(PoolClosed, match="stopped on purpose"):
        pool.client.call("closing", timeout=10)
    assert time.monotonic() - started < 0.5  # not its 10 s timeout
    assert pool.client.status("closing").state == "closed"
    # A node that starts reopens it
    poolq_pools.add_node(pool)
    assert pool.client.status("closing").state != "closed"
    pool.client.gate.forget("closing")  # the client trusts what it read of the pool for a second: read it again
    assert pool.client.call("closing", marker="open")["marker"] == "open"
