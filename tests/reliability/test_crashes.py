"""Processes killed under load, poison pills, and casts that fail: typed errors, nothing lost (defect 5).

A cast's failure reads the same as a call's: its handle raises the typed
error (``AgentCrashed``, ``CheckoutTimeout``, ``CallTimeout`` ...), never a
generic ``AgentError`` rebuilt by Celery.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from poolq import AgentCrashed, CallTimeout, CheckoutTimeout, InvalidArguments, UnknownOperation
from poolq.testing import PoolFactory, RunningPool
from tests.reliability.agents import Ledger
from tests.reliability.conftest import AGENT


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    return Ledger(tmp_path_factory.mktemp("crashes") / "ledger.txt")


@pytest.fixture(scope="module")
def pool(module_pools: PoolFactory, ledger: Ledger) -> Iterator[RunningPool]:
    yield module_pools.start("crashes", AGENT, size=3, max_deliveries=2, options={"ledger": str(ledger.path)})


def test_a_poison_pill_cast_fails_with_agent_crashed(pool: RunningPool, ledger: Ledger) -> None:
    handle = pool.client.cast("crashes", "pill", op="crash", call_timeout=30)
    with pytest.raises(AgentCrashed, match="killed its worker process 2 times") as caught:
        handle.result(timeout=30)
    assert caught.value.remote_type == "WorkerLost"
    assert ledger.count("start")["pill"] == 2  # delivered max_deliveries times, then refused
    assert handle.state == "FAILURE"
    assert pool.client.handle(handle.id).state == "FAILURE"  # the same, read by id


def test_a_poison_pill_call_fails_with_agent_crashed(pool: RunningPool) -> None:
    with pytest.raises(AgentCrashed):
        pool.client.call("crashes", "pill2", op="crash", timeout=30, call_timeout=30)


def test_a_cast_that_waited_past_its_timeout_fails_with_checkout_timeout(pool: RunningPool, ledger: Ledger) -> None:
    # Given every agent busy for 2 s
    busy = [pool.client.cast("crashes", f"busy{i}", 2.0, op="work") for i in range(3)]
    pool.wait_for(lambda: sum(ledger.count("start")[f"busy{i}"] for i in range(3)) == 3, timeout=10, what="busy")
    # When a cast may wait only 0.5 s for an agent
    late = pool.client.cast("crashes", "late", op="work", timeout=0.5)
    # Then its handle says CheckoutTimeout, and it never runs
    with pytest.raises(CheckoutTimeout):
        late.result(timeout=10)
    for handle in busy:
        handle.result(timeout=10)
    time.sleep(0.5)
    assert ledger.count("start")["late"] == 0


def test_cast_errors_are_the_typed_ones(pool: RunningPool) -> None:
    with pytest.raises(CallTimeout):
        pool.client.cast("crashes", "slow", 3.0, op="work", call_timeout=0.5).result(timeout=10)
    with pytest.raises(UnknownOperation):
        pool.client.cast("crashes", op="nope").result(timeout=10)
    with pytest.raises(InvalidArguments):
        pool.client.cast("crashes", 1, 2, 3, 4, op="work").result(timeout=10)


def test_twenty_kills_under_load_lose_nothing_and_run_nothing_twice(module_pools: PoolFactory, ledger: Ledger) -> None:
    pool = module_pools.start("killed", AGENT, size=3, options={"ledger": str(ledger.path)})
    results: dict[str, Any] = {}
    calls = 120

    def caller(part: int) -> None:
        for i in range(part, calls, 4):
            marker = f"load{i}"
            results[marker] = pool.client.call("killed", marker, 0.2, op="work", timeout=60, call_timeout=30)

    threads = [threading.Thread(target=caller, args=(part,)) for part in range(4)]
    for thread in threads:
        thread.start()
    # While the load runs, kill -9 the process of a busy agent 20 times, each time on another call
    # (a call killed max_deliveries times is a poison pill, and fails as one)
    rng, killed_tasks = random.Random(7), set()
    deadline = time.monotonic() + 60
    while len(killed_tasks) < 20 and time.monotonic() < deadline:
        time.sleep(0.3)
        busy = [a for a in pool.agents() if a.state == "busy" and a.task not in killed_tasks]
        if busy:
            victim = rng.choice(busy)
            try:
                os.kill(victim.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # it died between the look and the kill
            killed_tasks.add(victim.task)
    for thread in threads:
        thread.join(120)
    assert len(killed_tasks) == 20
    assert sorted(results) == sorted(f"load{i}" for i in range(calls))
    assert all(results[f"load{i}"]["marker"] == f"load{i}" for i in range(calls))
    done = ledger.count("done")
    assert all(done[f"load{i}"] == 1 for i in range(calls))  # each completed exactly once
    restarted = sum(ledger.count("start")[f"load{i}"] - 1 for i in range(calls))
    print(f"20 kills under load: {calls} calls, {restarted} of them restarted after a kill, 0 lost, 0 twice")
    pool.wait_for(lambda: len(pool.client.status("killed").agents) == 3, timeout=30, what="processes replaced")
