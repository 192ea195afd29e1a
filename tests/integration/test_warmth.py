"""F1: an agent is built once per worker process and serves many calls warm."""

from __future__ import annotations

import statistics
import time

import pytest
import redis

from poolq.testing import PoolFactory
from tests.agents import clear, events

CALLS = 1000


def test_setup_runs_once_per_process_across_1000_calls(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis, record_property: pytest.RecordProperty
) -> None:
    # Given a pool of 2 prefork processes whose agent takes 1 s to set up
    clear(state, "warm")
    started = time.monotonic()
    pool = poolq_pools.start(
        "warm", "tests.agents:Probe", size=2, options={"redis_url": poolq_broker, "setup_seconds": 1.0}
    )
    ready_s = time.monotonic() - started

    # When it serves 1,000 calls
    latencies = []
    pids = set()
    for _ in range(CALLS):
        t0 = time.perf_counter()
        answer = pool.client.call("warm", marker=None)
        latencies.append(time.perf_counter() - t0)
        pids.add(answer["pid"])

    # Then setup ran exactly once in each worker process, and never during the calls
    setups = events(state, "warm", "setup")
    setup_pids = {int(pid) for _, pid, _ in setups}
    assert len(setups) == 2
    assert pids <= setup_pids
    assert sum(a.requests for a in pool.agents()) == CALLS

    p50 = statistics.median(latencies) * 1000
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000
    record_property("warm_call_p50_ms", round(p50, 3))
    record_property("warm_call_p99_ms", round(p99, 3))
    print(f"\nwarmth: {CALLS} calls, setups={len(setups)}, ready in {ready_s:.2f}s, p50={p50:.2f}ms p99={p99:.2f}ms")
