"""RabbitMQ as the broker, Redis as the state store: calls, casts, leases, status and maintenance.

The faults on RabbitMQ are in tests/reliability/test_rabbitmq.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import poolq
from poolq import AgentError
from poolq.metrics import registry as metrics_registry
from poolq.store import registry
from poolq.testing import PoolFactory, RunningPool
from tests.agents import clear
from tests.conftest import needs_rabbitmq

pytestmark = needs_rabbitmq
AGENT = "tests.agents:Probe"


def _serving(pool: RunningPool) -> int:
    return sum(1 for a in pool.client.status(pool.name).agents if a.state in ("idle", "busy", "leased"))


def test_every_client_verb_on_rabbitmq(rabbit: PoolFactory, poolq_broker: str, state: redis.Redis) -> None:
    clear(state, "rq_verbs")
    pool = rabbit.start("rq_verbs", AGENT, size=2, options={"redis_url": poolq_broker})
    client = pool.client
    assert client.config.broker_url.startswith("amqp://")
    assert client.call("rq_verbs", marker="c1")["marker"] == "c1"
    handles = [client.cast("rq_verbs", op="work", marker=f"k{n}") for n in range(5)]
    assert sorted(h.result(timeout=20)["marker"] for h in handles) == [f"k{n}" for n in range(5)]
    with client.lease("rq_verbs") as agent:
        first, second = agent.call(marker="l1"), agent.call(marker="l2")
    assert first["agent"] == second["agent"]
    assert [r["marker"] for r in client.map("rq_verbs", [f"m{n}" for n in range(4)])] == [f"m{n}" for n in range(4)]
    with pytest.raises(AgentError, match="boom"):
        client.call("rq_verbs", "boom", op="fail")

    async def from_asyncio() -> list[str]:
        aclient = poolq.AsyncClient(client)
        try:
            answers = await asyncio.gather(*(aclient.call("rq_verbs", marker=f"a{n}") for n in range(3)))
        finally:
            await aclient.aclose()
        return [a["marker"] for a in answers]

    assert asyncio.run(from_asyncio()) == ["a0", "a1", "a2"]
    ran = state.lrange("test:rq_verbs:ran", 0, -1)
    assert sorted(ran) == sorted(["c1", *(f"k{n}" for n in range(5)), "l1", "l2", *(f"m{n}" for n in range(4)),
                                  "a0", "a1", "a2"])  # fmt: skip


def test_status_and_metrics_read_the_queue_depth_from_rabbitmq(rabbit: PoolFactory, poolq_broker: str) -> None:
    pool = rabbit.start("rq_depth", AGENT, size=1, max_overflow=0, options={"redis_url": poolq_broker})
    client = pool.client
    running = client.cast("rq_depth", op="work", marker="long", sleep=3.0)
    pool.wait_for(lambda: client.status("rq_depth").in_use == 1, timeout=10, what="a busy agent")
    queued = [client.cast("rq_depth", op="work", marker=f"q{n}") for n in range(3)]
    pool.wait_for(lambda: client.status("rq_depth").waiting == 3, timeout=10, what="3 waiting")
    assert client.status("rq_depth").state == "full"
    scraped = generate_latest(metrics_registry(client)).decode()
    waiting = {
        sample.labels["pool"]: sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
        if sample.name == "poolq_pool_waiting"
    }
    assert waiting == {"rq_depth": 3}
    running.result(timeout=20)
    assert sorted(h.result(timeout=20)["marker"] for h in queued) == ["q0", "q1", "q2"]
    assert client.status("rq_depth").waiting == 0


def test_maintenance_scales_a_pool_on_rabbitmq(rabbit: PoolFactory, poolq_broker: str, state: redis.Redis) -> None:
    clear(state, "rq_elastic")
    pool = rabbit.start(
        "rq_elastic", AGENT, size=1, min_size=1, max_size=3, maintenance_interval=1.0, idle_timeout=2.0,
        options={"redis_url": poolq_broker},
    )  # fmt: skip
    rabbit.start_maintenance(pool)
    handles = [pool.client.cast("rq_elastic", op="work", marker=f"b{n}", sleep=0.3) for n in range(30)]
    pool.wait_for(lambda: _serving(pool) == 3, timeout=30, what="scaled to max_size on RabbitMQ")
    assert {h.result(timeout=60)["marker"] for h in handles} == {f"b{n}" for n in range(30)}
    pool.wait_for(lambda: _serving(pool) == 1, timeout=40, what="scaled back to min_size")
    directions = [e["direction"] for e in registry.scale_events(state, "rq_elastic") if e["node"] == ""]
    assert "up" in directions and "down" in directions
    time.sleep(2.0)
    assert _serving(pool) == 1
