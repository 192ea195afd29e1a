"""F11: fail fast instead of waiting out a timeout: block=False and max_waiting."""

from __future__ import annotations

import time

import pytest

from poolq import PoolExhausted
from poolq.testing import PoolFactory


def test_block_false_fails_at_once_when_no_agent_is_free(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start("tight", "tests.agents:Probe", size=1, options={"redis_url": poolq_broker})
    assert pool.client.call("tight", block=False)["calls"] == 1  # a free agent: the call runs
    busy = pool.client.cast("tight", sleep=2.0)
    pool.wait_for(lambda: pool.client.status("tight").in_use == 1, timeout=10, what="agent busy")

    latencies = []
    for _ in range(20):
        started = time.perf_counter()
        with pytest.raises(PoolExhausted, match="no agent of pool 'tight' is free"):
            pool.client.call("tight", marker="never", block=False)
        latencies.append(time.perf_counter() - started)
    print(f"\nPoolExhausted in {max(latencies) * 1000:.2f}ms at most")
    assert max(latencies) < 0.05
    assert pool.client.status("tight").waiting == 0  # nothing was sent
    busy.result(timeout=10)


def test_block_false_waits_for_overflow_that_can_still_start(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start("roomy", "tests.agents:Probe", size=1, max_overflow=1, options={"redis_url": poolq_broker})
    busy = pool.client.cast("roomy", sleep=1.5)
    pool.wait_for(lambda: pool.client.status("roomy").in_use == 1, timeout=10, what="agent busy")
    assert pool.client.call("roomy", block=False, timeout=10)["calls"] == 1  # ran on an overflow agent
    busy.result(timeout=10)


def test_max_waiting_bounds_the_queue(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start(
        "bounded", "tests.agents:Probe", size=1, max_waiting=2, options={"redis_url": poolq_broker}
    )
    running = pool.client.cast("bounded", sleep=1.5)
    pool.wait_for(lambda: pool.client.status("bounded").in_use == 1, timeout=10, what="agent busy")
    queued = [pool.client.cast("bounded") for _ in range(2)]
    started = time.perf_counter()
    with pytest.raises(PoolExhausted, match="2 calls waiting"):
        pool.client.call("bounded", timeout=30)
    assert time.perf_counter() - started < 0.05  # not after its 30 s timeout
    for handle in [running, *queued]:
        handle.result(timeout=10)
    assert pool.client.call("bounded")["calls"] >= 1
