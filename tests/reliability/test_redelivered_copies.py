"""A redelivered copy of a call never runs it twice, and never costs the call (defect 4).

The Redis broker hands a call out again when its visibility timeout passes
without an acknowledgement (or when a consumer's connection drops). The copy
and the original share one delivery tag. poolq holds such a copy back while
the first run lives, without acknowledging it: acknowledging would delete the
broker's only record of the call, and a crash of the first run would then
lose it.
"""

from __future__ import annotations

import json
import os
import signal
import time

import kombu
import redis

from poolq.local.embedded import EmbeddedRedis
from poolq.testing import PoolFactory
from tests.reliability.agents import Ledger
from tests.reliability.conftest import AGENT


def _redeliver(broker_url: str, task_id: str) -> None:
    """Do what kombu's visibility sweep does to a call it thinks abandoned: put a copy back in its queue."""
    client = redis.Redis.from_url(broker_url, decode_responses=True)
    [tag] = [tag for tag, raw in client.hgetall("unacked").items() if json.loads(raw)[0]["headers"]["id"] == task_id]
    with kombu.Connection(broker_url) as connection:
        connection.default_channel.qos.restore_by_tag(tag, leftmost=True)
    client.close()


def test_a_copy_held_back_takes_over_when_the_first_run_dies(
    pools: PoolFactory, broker: EmbeddedRedis, ledger: Ledger
) -> None:
    pool = pools.start("dup", AGENT, size=2, options={"ledger": str(ledger.path)})
    handle = pool.client.cast("dup", "m1", 4.0, op="work", call_timeout=30)
    pool.wait_for(lambda: ledger.count("start")["m1"] == 1, timeout=10, what="first run started")
    [first] = ledger.pids("start", "m1")

    # Given the broker hands a copy out while the first run lives
    _redeliver(broker.url, handle.id)
    pool.wait_for(lambda: "holding back a copy" in pool.workers[0].log(), timeout=10, what="copy held back")
    assert ledger.count("start")["m1"] == 1  # the copy did not run

    # When the first run's process dies
    os.kill(first, signal.SIGKILL)

    # Then the call is taken over and completes once
    assert handle.result(timeout=30)["pid"] != first
    assert ledger.count("done")["m1"] == 1
    time.sleep(2)  # any further copy would run now
    assert ledger.count("start")["m1"] == 2 and ledger.count("done")["m1"] == 1


def test_a_copy_of_a_call_that_finished_is_dropped(pools: PoolFactory, broker: EmbeddedRedis, ledger: Ledger) -> None:
    pool = pools.start("dupdone", AGENT, size=2, options={"ledger": str(ledger.path)})
    handle = pool.client.cast("dupdone", "m1", 2.0, op="work")
    pool.wait_for(lambda: ledger.count("start")["m1"] == 1, timeout=10, what="first run started")
    _redeliver(broker.url, handle.id)
    assert handle.result(timeout=20)["marker"] == "m1"
    # The held copy is acknowledged and dropped once the first run is done
    pool.wait_for(lambda: not redis.Redis.from_url(broker.url).hlen("unacked"), timeout=10, what="nothing unacked")
    assert ledger.count("start")["m1"] == 1


def test_a_call_longer_than_the_redelivery_timeout_runs_once(
    pools: PoolFactory, broker: EmbeddedRedis, ledger: Ledger
) -> None:
    # Given the shortest redelivery timeout, and a call that runs longer than it
    env = {"POOLQ_REDELIVERY_TIMEOUT": "10"}
    pool = pools.start("long", AGENT, size=2, env=env, options={"ledger": str(ledger.path)})
    assert pool.client.call("long", "warm")["marker"] == "warm"
    result = pool.client.call("long", "m1", 13.0, op="work", timeout=5, call_timeout=30)
    # Then the live node renewed it: it was never handed out again
    assert result["marker"] == "m1"
    assert ledger.count("start")["m1"] == 1
    assert "holding back" not in pool.workers[0].log()
