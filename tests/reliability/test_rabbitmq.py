"""The key faults with RabbitMQ as the broker (Redis keeps poolq's state).

RabbitMQ hands a consumer's unacknowledged messages to another as soon as its
connection closes: a killed node's calls run again at once. Skipped, with the
reason printed, where no RabbitMQ listens on 127.0.0.1:5672 (guest/guest, or
``POOLQ_TEST_AMQP_URL``), unless ``POOLQ_REQUIRE_RABBITMQ=1`` (as ``.ci/run``
sets where it listens) makes that fail; the fixture ``rabbit`` is in tests/conftest.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from poolq import AgentCrashed, InvalidPayload
from poolq.testing import PoolFactory
from tests.conftest import needs_rabbitmq
from tests.reliability.agents import Ledger
from tests.reliability.conftest import AGENT, kill_node

pytestmark = needs_rabbitmq


def test_calls_casts_leases_and_status_on_rabbitmq(rabbit: PoolFactory, ledger: Ledger) -> None:
    pool = rabbit.start("rmq_basic", AGENT, size=2, options={"ledger": str(ledger.path)})
    assert pool.client.call("rmq_basic", "m1")["marker"] == "m1"
    assert pool.client.cast("rmq_basic", "c1").result(timeout=10)["marker"] == "c1"
    with pool.client.lease("rmq_basic") as agent:
        assert agent.call("l1")["agent"] == agent.call("l2")["agent"]
    status = pool.client.status("rmq_basic")
    assert status.size == 2 and status.waiting == 0
    with pytest.raises(InvalidPayload):
        pool.client.call("rmq_basic", _deep(101))


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def test_a_killed_process_and_a_poison_pill_on_rabbitmq(rabbit: PoolFactory, ledger: Ledger) -> None:
    pool = rabbit.start("rmq_kill", AGENT, size=2, max_deliveries=2, options={"ledger": str(ledger.path)})
    handle = pool.client.cast("rmq_kill", "m1", 2.0, op="work")
    pool.wait_for(lambda: ledger.count("start")["m1"] == 1, timeout=10, what="call running")
    [pid] = ledger.pids("start", "m1")
    os.kill(pid, signal.SIGKILL)
    assert handle.result(timeout=30)["pid"] != pid
    assert ledger.count("done")["m1"] == 1
    with pytest.raises(AgentCrashed):
        pool.client.cast("rmq_kill", "pill", op="crash").result(timeout=60)


def test_a_node_killed_mid_burst_on_rabbitmq(rabbit: PoolFactory, ledger: Ledger) -> None:
    pool = rabbit.start("rmq_node", AGENT, size=2, options={"ledger": str(ledger.path)})
    results: dict[str, Any] = {}

    def caller(i: int) -> None:
        results[f"m{i}"] = pool.client.call("rmq_node", f"m{i}", 1.0, op="work", timeout=60, call_timeout=30)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    pool.wait_for(lambda: len(ledger.count("start")) >= 2, timeout=10, what="calls running")
    kill_node(pool.workers.pop())
    rabbit.add_node(pool)
    back = time.monotonic()
    for thread in threads:
        thread.join(30)
    # RabbitMQ gave the dead node's calls back when its connection closed: no waiting on a timeout
    assert time.monotonic() - back < 10
    assert sorted(results) == [f"m{i}" for i in range(4)]
    assert all(ledger.count("done")[f"m{i}"] == 1 for i in range(4))
