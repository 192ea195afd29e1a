"""F15, F16: each recycling trigger replaces the agent, under load, with every result checked:
no call lost, none run twice, and an unhealthy agent never serves a call."""

from __future__ import annotations

import threading
import time
from collections import Counter

import redis

from poolq.testing import PoolFactory, RunningPool
from tests.agents import clear, done, events, ran


def _load(pool: RunningPool, name: str, count: int, sleep: float = 0.05) -> list[dict[str, object]]:
    """``count`` work calls from 4 threads; every result, checked against its marker."""
    results: list[dict[str, object]] = []
    lock = threading.Lock()

    def run(part: int) -> None:
        for i in range(part, count, 4):
            answer = pool.client.call(name, f"m{i}", sleep, op="work", timeout=30)
            assert answer["marker"] == f"m{i}"
            with lock:
                results.append(answer)

    threads = [threading.Thread(target=run, args=(part,)) for part in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def _exactly_once(state: redis.Redis, name: str, count: int) -> None:
    expected = {f"m{i}" for i in range(count)}
    assert Counter(ran(state, name)) == Counter(expected)  # none ran twice
    assert set(done(state, name)) == expected  # none lost


def test_max_requests_recycles_busy_agents_after_their_call(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "byrequests")
    pool = poolq_pools.start(
        "byrequests", "tests.agents:Probe", size=2, max_requests=10, recycle_jitter=0.2,
        options={"redis_url": poolq_broker},
    )  # fmt: skip
    assert len(_load(pool, "byrequests", 80)) == 80
    _exactly_once(state, "byrequests", 80)
    # The last recycle may still be running: it happens after its call replied.
    pool.wait_for(
        lambda: len(events(state, "byrequests", "setup")) == 2 + pool.client.status("byrequests").counters["recycles"],
        timeout=10,
        what="every recycle counted",
    )
    recycles = pool.client.status("byrequests").counters["recycles"]
    # Each agent past its limit serves on until its replacement is warm, so a little
    # fewer than 80 / (10 - jitter) recycles
    assert 3 <= recycles <= 10


def test_max_age_recycles_agents(poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis) -> None:
    clear(state, "byage")
    pool = poolq_pools.start("byage", "tests.agents:Probe", size=2, max_age=0.5, options={"redis_url": poolq_broker})
    started = time.monotonic()
    assert len(_load(pool, "byage", 40, sleep=0.1)) == 40
    elapsed = time.monotonic() - started
    _exactly_once(state, "byage", 40)
    assert pool.client.status("byage").counters["recycles"] >= int(elapsed / 0.5) - 1


def test_idle_agents_past_max_age_are_replaced_by_maintenance(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "oldidle")
    pool = poolq_pools.start(
        "oldidle", "tests.agents:Probe", size=2, max_age=2.0, maintenance_interval=0.5, recycle_jitter=0,
        options={"redis_url": poolq_broker},
    )  # fmt: skip
    poolq_pools.start_maintenance(pool)
    first = {a.pid for a in pool.client.status("oldidle").agents}
    # Idle agents serve no call that could trigger their recycling: maintenance replaces them,
    # one at a time, each replacement warm before the old process leaves.
    pool.wait_for(
        lambda: not first & {a.pid for a in pool.client.status("oldidle").agents}, timeout=30, what="both replaced"
    )
    replaced = pool.client.status("oldidle")
    assert replaced.counters["recycles"] >= 2 and len(replaced.agents) == 2
    assert pool.client.call("oldidle")["pid"] not in first


def test_memory_limit_recycles_in_place_when_teardown_returns_it(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "hog")
    pool = poolq_pools.start("hog", "tests.agents:Probe", size=1, options={"redis_url": poolq_broker})
    baseline = pool.agents()[0].rss_mb or _rss(pool)
    pool.workers.pop().stop()
    pool = poolq_pools.start(
        "hog", "tests.agents:Probe", size=1, max_memory_mb=baseline + 60, options={"redis_url": poolq_broker}
    )
    pid = pool.client.call("hog")["pid"]
    assert pool.client.call("hog", 100, op="hog") == 100  # over the limit after this call
    pool.wait_for(lambda: len(events(state, "hog", "setup")) == 3, timeout=10, what="recycled in place")
    assert pool.client.call("hog")["pid"] == pid  # same process: teardown gave the memory back


def test_memory_teardown_cannot_return_replaces_the_process(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "leaky")
    pool = poolq_pools.start("leaky", "tests.agents:Probe", size=1, options={"redis_url": poolq_broker})
    baseline = _rss(pool)
    pool.workers.pop().stop()
    pool = poolq_pools.start(
        "leaky", "tests.agents:Probe", size=1, max_memory_mb=baseline + 60, options={"redis_url": poolq_broker}
    )
    pid = pool.client.call("leaky")["pid"]
    pool.client.call("leaky", 100, op="leak")
    # The node's scaler starts a new process, and retires the leaky one once the new agent is warm
    pool.wait_for(lambda: {a.pid for a in pool.client.status("leaky").agents} - {pid}, timeout=30, what="new process")
    pool.wait_for(lambda: pid not in {a.pid for a in pool.client.status("leaky").agents}, timeout=30, what="old gone")
    assert pool.client.call("leaky")["pid"] != pid


def test_an_unhealthy_agent_never_serves_a_call(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "sick")
    pool = poolq_pools.start(
        "sick", "tests.agents:Probe", size=2, health_interval=0.5, options={"redis_url": poolq_broker}
    )
    sick = pool.client.call("sick")["agent"]
    state.set(f"test:sick:unhealthy:{sick}", 1)
    try:
        # Under load right away: the health check before each call keeps it from serving
        answers = _load(pool, "sick", 40)
        assert sick not in {a["agent"] for a in answers}
        _exactly_once(state, "sick", 40)
        assert pool.client.status("sick").counters["recycles"] >= 1
    finally:
        state.delete(f"test:sick:unhealthy:{sick}")


def test_an_agent_turning_unhealthy_while_idle_is_replaced(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "idlesick")
    pool = poolq_pools.start(
        "idlesick", "tests.agents:Probe", size=2, health_interval=0.5, options={"redis_url": poolq_broker}
    )
    sick = pool.agents()[0]
    state.set(f"test:idlesick:unhealthy:{sick.name}", 1)
    try:
        # No call needed: the periodic check marks it, the node's scaler replaces its process
        pool.wait_for(
            lambda: sick.id not in {a.id for a in pool.client.status("idlesick").agents},
            timeout=30,
            what="unhealthy idle agent replaced",
        )
        assert len(pool.client.status("idlesick").agents) == 2
    finally:
        state.delete(f"test:idlesick:unhealthy:{sick.name}")


def _rss(pool: RunningPool) -> float:
    pool.wait_for(lambda: bool(pool.agents() and pool.agents()[0].rss_mb), timeout=10, what="rss published")
    return pool.agents()[0].rss_mb
