"""F29: JSON only. A pickle message is refused by the worker and never runs."""

from __future__ import annotations

import redis

from poolq.testing import PoolFactory
from tests.agents import clear, ran


def test_pickle_message_is_refused_and_the_worker_serves_on(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "secure")
    pool = poolq_pools.start("secure", "tests.agents:Probe", size=1, options={"redis_url": poolq_broker})
    # Given a message serialized with pickle, sent straight to the pool's queue
    pool.client.app.send_task(
        "poolq.secure", kwargs={"marker": "pickled"}, queue="poolq.secure", serializer="pickle", ignore_result=True
    )
    pool.wait_for(lambda: state.llen("poolq.secure") == 0, timeout=10, what="message consumed")
    # When a JSON call follows, it runs; the pickled one never did
    assert pool.client.call("secure", marker="json")["marker"] == "json"
    assert ran(state, "secure") == ["json"]
    assert "ContentDisallowed" in pool.workers[0].log() or "disallowed" in pool.workers[0].log().lower()
