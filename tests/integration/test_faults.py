"""F18, F19, F26: a process killed mid-call, a poison pill, a setup that keeps failing, a stop under load."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest
import redis

from poolq import AgentCrashed, AgentUnavailable, PoolDegraded
from poolq.testing import PoolFactory
from tests.agents import clear, done, ran


def test_kill_9_of_a_busy_process_the_call_completes_exactly_once(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "killed")
    pool = poolq_pools.start("killed", "tests.agents:Probe", size=2, options={"redis_url": poolq_broker})
    handle = pool.client.cast("killed", "victim", 2.0, op="work")
    pool.wait_for(lambda: ran(state, "killed") == ["victim"], timeout=10, what="the call running")
    [busy] = [a for a in pool.client.status("killed").agents if a.state == "busy"]
    os.kill(busy.pid, signal.SIGKILL)

    # The message is redelivered (acks late, reject on worker lost) and taken over on a live agent
    assert handle.result(timeout=30)["pid"] != busy.pid
    assert done(state, "killed") == ["victim"]  # completed exactly once
    assert Counter(ran(state, "killed"))["victim"] == 2  # started twice: the first run died
    pool.wait_for(lambda: len(pool.client.status("killed").agents) == 2, timeout=30, what="process replaced")
    assert pool.client.call("killed")["calls"] >= 1


def test_a_poison_pill_is_delivered_a_bounded_number_of_times(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    pool = poolq_pools.start(
        "poison", "tests.agents:Probe", size=2, max_deliveries=2, options={"redis_url": poolq_broker}
    )
    started = time.monotonic()
    with pytest.raises(AgentCrashed, match="killed its worker process 2 times"):
        pool.client.call("poison", op="crash", timeout=30, call_timeout=30)
    assert time.monotonic() - started < 30
    pool.wait_for(lambda: len(pool.client.status("poison").agents) == 2, timeout=30, what="processes replaced")
    assert pool.client.call("poison")["calls"] >= 1  # the worker serves on


def test_setup_that_keeps_failing_degrades_the_pool_then_it_recovers(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    clear(state, "flaky")
    state.set("test:flaky:fail_setup", 1)
    pool = poolq_pools.start(
        "flaky", "tests.agents:Probe", size=1, breaker_failures=2, breaker_window=30, breaker_reset=2,
        options={"redis_url": poolq_broker},
    )  # fmt: skip
    # Calls fail while setup fails, each retrying the setup after a backoff, until
    # breaker_failures failures within breaker_window open the breaker
    with pytest.raises(AgentUnavailable):
        pool.client.call("flaky", timeout=5)

    def degraded() -> bool:
        try:
            pool.client.call("flaky", timeout=5)
        except PoolDegraded:
            return True
        except AgentUnavailable:
            time.sleep(0.2)
        return False

    pool.wait_for(degraded, timeout=15, what="breaker open")
    status = pool.client.status("flaky")
    assert status.state == "degraded" and "setup failed on purpose" in status.degraded_by

    # While degraded, calls fail fast without being sent, carrying the setup error
    started = time.perf_counter()
    with pytest.raises(PoolDegraded, match="setup failed on purpose"):
        pool.client.call("flaky", timeout=5)
    assert time.perf_counter() - started < 0.05
    assert pool.client.status("flaky").waiting == 0

    # When setup works again, the breaker half-opens and the pool recovers
    state.delete("test:flaky:fail_setup")

    def recovered() -> bool:
        try:
            return bool(pool.client.call("flaky", timeout=5))
        except (PoolDegraded, AgentUnavailable):
            time.sleep(0.5)
            return False

    pool.wait_for(recovered, timeout=30, what="recovery")
    assert pool.client.status("flaky").state == "ready"


def test_stop_under_load_loses_nothing(poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis) -> None:
    clear(state, "drained")
    pool = poolq_pools.start("drained", "tests.agents:Probe", size=2, options={"redis_url": poolq_broker})
    handles = [pool.client.cast("drained", f"m{i}", 0.3, op="work") for i in range(20)]
    pool.wait_for(lambda: len(done(state, "drained")) >= 4, timeout=10, what="some calls done")

    # When the pool is stopped (its nodes drain their in-flight calls)
    stopped = pool.client.stop("drained", timeout=60)
    node = pool.workers.pop()
    assert stopped == [node.node]
    assert node.stop(timeout=30) == 0  # it had exited on its own, cleanly
    finished = set(done(state, "drained"))
    # Then the calls in flight finished, and the rest wait in the queue
    assert set(ran(state, "drained")) == finished
    assert pool.client.status("drained").waiting == 20 - len(finished)

    # And a new node takes them over: every call completes, exactly once
    poolq_pools.add_node(pool)
    assert {h.result(timeout=60)["marker"] for h in handles} == {f"m{i}" for i in range(20)}
    assert Counter(done(state, "drained")) == Counter({f"m{i}": 1 for i in range(20)})
