"""F6: where poolq picks the agent (a threads worker), lifo reuses the most recent one, fifo rotates."""

from __future__ import annotations

from collections import Counter

from poolq.testing import PoolFactory


def test_lifo_reuses_the_most_recently_used_agent(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start(
        "lifo",
        "tests.agents:Probe",
        size=3,
        worker_pool="threads",
        strategy="lifo",
        options={"redis_url": poolq_broker},
    )
    used = Counter(pool.client.call("lifo")["agent"] for _ in range(30))
    assert len(used) == 1  # one warm agent served every sequential call


def test_fifo_spreads_work_evenly(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start(
        "fifo",
        "tests.agents:Probe",
        size=3,
        worker_pool="threads",
        strategy="fifo",
        options={"redis_url": poolq_broker},
    )
    used = Counter(pool.client.call("fifo")["agent"] for _ in range(30))
    assert sorted(used.values()) == [10, 10, 10]
