"""F4, F5: overflow agents start under load, never beyond size + max_overflow, and retire when idle."""

from __future__ import annotations

import redis

from poolq.store.records import SERVING
from poolq.testing import PoolFactory
from tests.agents import clear, max_running


def test_burst_grows_into_overflow_and_falls_back_to_size(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "burst")
    pool = poolq_pools.start(
        "burst", "tests.agents:Probe", size=2, max_overflow=1, overflow_idle=1.5, options={"redis_url": poolq_broker}
    )
    # Given a burst of work longer than the base agents can absorb
    handles = [pool.client.cast("burst", 0.8, op="track") for _ in range(12)]
    # (counted once it is set up: a starting agent is not capacity yet)
    pool.wait_for(
        lambda: sum(a.state in SERVING for a in pool.agents()) == 3, timeout=15, what="an overflow agent, set up"
    )
    during = pool.client.status("burst")
    assert during.overflow == 1 and during.max_overflow == 1 and during.size == 2
    for handle in handles:
        handle.result(timeout=30)

    # Then never more than size + max_overflow calls ran at once, and overflow was used
    assert max_running(state, "burst") == 3
    # And after overflow_idle the extra agent retires, back to size (not below)
    pool.wait_for(lambda: len(pool.agents()) == 2, timeout=15, what="back to size")
    after = pool.client.status("burst")
    assert (after.size, after.overflow, after.state) == (2, 0, "ready")
    assert after.counters["scale_ups"] == 1 and after.counters["scale_downs"] == 1
    assert after.last_scale is not None and after.last_scale["direction"] == "down"
    assert after.counters["terminated"] == 1  # the overflow agent was torn down
