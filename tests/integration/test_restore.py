"""F21: a pool comes back from a full restart (broker, workers, maintainer, beat) as it was.

Its size as maintenance last scaled it, its counters and its agents' names.
"""

from __future__ import annotations

from pathlib import Path

from poolq.local.embedded import EmbeddedRedis
from poolq.testing import PoolFactory, RunningPool
from tests.conftest import ROOT

SERVING = ("idle", "busy", "leased")


def _serving(pool: RunningPool) -> list[str]:
    return sorted(a.name for a in pool.client.status(pool.name).agents if a.state in SERVING)


def test_a_full_restart_comes_back_at_the_scaled_size_with_counters_and_names(tmp_path: Path) -> None:
    broker = EmbeddedRedis(tmp_path / "broker", persist=True)
    broker.start()
    try:
        pools = PoolFactory(broker.url, tmp_path, pythonpath=[str(ROOT)])
        try:
            pool = pools.start(
                "durable", "tests.agents:Probe", size=1, min_size=1, max_size=3, maintenance_interval=1.0,
                idle_timeout=120.0, options={"redis_url": broker.url},
            )  # fmt: skip
            pools.start_maintenance(pool)
            # Given a burst that made maintenance scale the pool up to 3
            handles = [pool.client.cast("durable", f"m{i}", 0.3, op="work") for i in range(30)]
            pool.wait_for(lambda: len(_serving(pool)) == 3, timeout=30, what="scaled to 3")
            for handle in handles:
                handle.result(timeout=60)
            pool.wait_for(lambda: pool.client.status("durable").available == 3, timeout=10, what="idle")
            names, before = _serving(pool), pool.client.status("durable").counters

            # When everything stops, the broker too (it persists), and starts again
            for process in [*pool.services, *pool.workers]:
                process.stop(timeout=30)
            pool.services.clear()
            pool.workers.clear()
            broker.restart()
            pools.add_node(pool, wait=False)
            pools.start_maintenance(pool)

            # Then the pool is back at its scaled size, with its counters and its agents' names
            pool.wait_for(lambda: len(_serving(pool)) == 3, timeout=30, what="back at 3")
            after = pool.client.status("durable").counters
            assert after["requests"] == before["requests"] >= 30
            assert after["spawned"] == before["spawned"] + 3
            assert after["scale_ups"] == before["scale_ups"]
            assert _serving(pool) == names
            assert pool.client.status("durable").size == 3
        finally:
            pools.stop_all()
    finally:
        broker.stop()  # even when stopping the workers raised
