"""Dynamic batching: the calls of a ``@poolq.batched`` operation share one agent invocation."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from poolq import AgentCrashed, AgentError, InvalidArguments
from poolq.testing import PoolFactory, RunningPool
from tests.batch_agents import clear, sizes

AGENT = "tests.batch_agents:Gatherer"


def start(poolq_pools: PoolFactory, broker: str, state: redis.Redis, name: str, **keys: Any) -> RunningPool:
    clear(state, name)
    return poolq_pools.start(name, AGENT, options={"redis_url": broker}, **keys)


def test_concurrent_callers_share_batches_and_each_gets_its_own_result(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    pool = start(poolq_pools, poolq_broker, state, "batch", size=2)

    # Given 32 callers at once, each sending its own number
    with ThreadPoolExecutor(32) as callers:
        results = list(callers.map(lambda n: pool.client.call("batch", {"n": n}, op="square", timeout=30), range(32)))

    # Then each caller gets the square of its own number
    assert [r["square"] for r in results] == [n * n for n in range(32)]
    # And the agents saw batches larger than one, never larger than max_size, one item per call
    seen = sizes(state, "batch")
    assert sum(seen) == 32
    assert max(seen) > 1 and max(seen) <= 8
    assert max(r["batch"] for r in results) > 1

    # And the pool's non-batched operation still works, next to the batched one
    assert pool.client.call("batch", timeout=10)["op"] == "handle"


def test_a_lone_call_waits_at_most_max_wait(poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis) -> None:
    pool = start(poolq_pools, poolq_broker, state, "lone", size=1)
    pool.client.call("lone", {"n": 0}, op="square", timeout=10)  # connections warm

    latencies = []
    for n in range(5):
        started = time.perf_counter()
        assert pool.client.call("lone", {"n": n}, op="square", timeout=10)["batch"] == 1
        latencies.append(time.perf_counter() - started)

    # max_wait is 50 ms: a lone call is sent on after it, not held for companions that never come
    assert min(latencies) >= 0.04
    assert sorted(latencies)[2] < 0.05 + 0.15


def test_an_item_error_reaches_only_its_caller(poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis) -> None:
    pool = start(poolq_pools, poolq_broker, state, "itemerr", size=1)

    handles = [pool.client.cast("itemerr", {"n": n, "fail": n == 3}, op="square") for n in range(6)]

    for n, handle in enumerate(handles):
        if n == 3:
            with pytest.raises(AgentError, match="item 3 failed on purpose") as failed:
                handle.result(timeout=30)
            assert failed.value.remote_type == "ValueError"
        else:
            assert handle.result(timeout=30)["square"] == n * n
    assert max(sizes(state, "itemerr")) > 1  # the failing item shared its batch

    # A call that does not send exactly one item is refused alone
    with pytest.raises(InvalidArguments, match="exactly one positional argument"):
        pool.client.call("itemerr", {"n": 1}, {"n": 2}, op="square", timeout=10)
    # A batch whose results do not match its items fails every call of it, clearly
    with pytest.raises(AgentError, match="returned 2 results for 1 items"):
        pool.client.call("itemerr", 1, op="wrong_length", timeout=10)


def test_kill_9_during_a_batch_every_call_completes_exactly_once(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    pool = start(poolq_pools, poolq_broker, state, "batchkill", size=2)

    # Given a batch of 6 calls running (its first invocation holds for 3 s)
    handles = [
        pool.client.cast("batchkill", {"n": n, "marker": f"m{n}", "hold": 3.0}, op="square", call_timeout=60)
        for n in range(6)
    ]
    pool.wait_for(lambda: len(set(state.lrange("test:batchkill:ran", 0, -1))) == 6, timeout=10, what="batch running")
    [busy] = [a for a in pool.client.status("batchkill").agents if a.state == "busy"]

    # When its process is killed
    os.kill(busy.pid, signal.SIGKILL)

    # Then every call is redelivered and completes, each exactly once, on another process
    results = [handle.result(timeout=60) for handle in handles]
    assert [r["square"] for r in results] == [n * n for n in range(6)]
    assert all(r["pid"] != busy.pid for r in results)
    assert Counter(state.lrange("test:batchkill:done", 0, -1)) == Counter(f"m{n}" for n in range(6))


def test_a_call_that_kills_its_batch_fails_alone_after_max_deliveries(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    pool = start(poolq_pools, poolq_broker, state, "batchpoison", size=2, max_deliveries=2)

    # Given a poison call sent together with innocent ones
    handles = [
        pool.client.cast("batchpoison", {"n": n, "marker": f"p{n}", "crash": n == 2}, op="square", call_timeout=60)
        for n in range(5)
    ]

    # Then the poison call fails with AgentCrashed, and the others complete exactly once
    for n, handle in enumerate(handles):
        if n == 2:
            with pytest.raises(AgentCrashed, match="killed its worker process 2 times"):
                handle.result(timeout=90)
        else:
            assert handle.result(timeout=90)["square"] == n * n
    done = Counter(state.lrange("test:batchpoison:done", 0, -1))
    assert done == Counter(f"p{n}" for n in range(5) if n != 2)
