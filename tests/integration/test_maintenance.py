"""F14, F17: beat's maintenance scales a pool between its bounds, without flapping (restarts: test_restore)."""

from __future__ import annotations

import time

import redis

from poolq.scaling import maintenance
from poolq.store import registry
from poolq.testing import PoolFactory, RunningPool
from tests.agents import clear

INTERVAL = 1.0


def _agents(pool: RunningPool) -> int:
    return sum(1 for a in pool.client.status(pool.name).agents if a.state in ("idle", "busy", "leased"))


def test_a_burst_scales_up_within_two_intervals_then_back_down(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "elastic")
    pool = poolq_pools.start(
        "elastic", "tests.agents:Probe", size=1, min_size=1, max_size=4, maintenance_interval=INTERVAL,
        idle_timeout=2.0, options={"redis_url": poolq_broker},
    )  # fmt: skip
    poolq_pools.start_maintenance(pool)
    pool.wait_for(lambda: pool.client.status("elastic").counters["requests"] >= 0, what="maintenance")

    # When a burst arrives
    burst_at = time.time()
    handles = [pool.client.cast("elastic", f"m{i}", 0.3, op="work") for i in range(40)]
    pool.wait_for(lambda: _agents(pool) == 4, timeout=20, what="scaled to max_size")
    up = [e for e in registry.scale_events(state, "elastic") if e["direction"] == "up" and e["node"] == ""]
    reaction = up[-1]["at"] - burst_at
    print(f"\nscale-up decided {reaction:.2f}s after the burst (interval {INTERVAL:g}s)")
    assert reaction <= 2 * INTERVAL + 0.5
    assert {h.result(timeout=60)["marker"] for h in handles} == {f"m{i}" for i in range(40)}

    # Then, idle, it steps back down to min_size and no further
    pool.wait_for(lambda: _agents(pool) == 1, timeout=30, what="scaled back to min_size")
    time.sleep(3 * INTERVAL)
    assert _agents(pool) == 1
    downs = [e for e in registry.scale_events(state, "elastic") if e["direction"] == "down" and e["node"] == ""]
    assert [(e["from"], e["to"]) for e in reversed(downs)] == [(4, 3), (3, 2), (2, 1)]


def test_a_duplicate_maintenance_run_does_nothing(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start(
        "locked", "tests.agents:Probe", size=1, min_size=1, max_size=2, maintenance_interval=5.0,
        options={"redis_url": poolq_broker},
    )  # fmt: skip
    client = pool.client
    first = maintenance.maintain(client.app, client.config, "locked", client.state)
    second = maintenance.maintain(client.app, client.config, "locked", client.state)
    assert first is not None and second is None
