"""A call that an agent took is finished after a crash, whatever its queue deadline (defect 1).

The deadline (``timeout``) bounds how long a call waits for an agent; once an
agent took it, a crash must not turn it into a lost call. The redelivered copy
is taken over by a live agent: the caller gets the result.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from poolq.testing import PoolFactory, RunningPool
from tests.reliability.agents import Ledger
from tests.reliability.conftest import AGENT


def _start(pools: PoolFactory, ledger: Ledger, name: str) -> RunningPool:
    return pools.start(name, AGENT, size=2, options={"ledger": str(ledger.path)})


def _kill_when_started(pool: RunningPool, ledger: Ledger, marker: str, after: float) -> int:
    """Wait until ``marker`` runs, then until ``after`` seconds since, and SIGKILL its process; its pid."""
    pool.wait_for(lambda: ledger.count("start")[marker] == 1, timeout=10, what=f"{marker} running")
    [pid] = ledger.pids("start", marker)
    time.sleep(max(0.0, ledger.at("start", marker)[0] + after - time.time()))
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_call_killed_past_its_queue_deadline_completes(pools: PoolFactory, ledger: Ledger) -> None:
    pool = _start(pools, ledger, "late")
    outcome: dict[str, Any] = {}

    def caller() -> None:
        started = time.monotonic()
        outcome["result"] = pool.client.call("late", "m1", 3.0, op="work", timeout=1, call_timeout=10)
        outcome["waited"] = time.monotonic() - started

    # Given a call that may wait 1 s for an agent, and runs 3 s once taken
    thread = threading.Thread(target=caller)
    thread.start()
    # When its process is killed 1.5 s in: past the call's queue deadline
    killed = _kill_when_started(pool, ledger, "m1", after=1.5)
    thread.join(30)

    # Then another agent takes it over and the caller gets the result
    assert not thread.is_alive()
    assert outcome["result"]["marker"] == "m1" and outcome["result"]["pid"] != killed
    assert ledger.count("start")["m1"] == 2  # the first run died
    assert ledger.count("done")["m1"] == 1  # completed exactly once
    assert outcome["waited"] < 1 + 10 + 2 + 3  # within the caller's bound, plus the rerun


def test_a_cast_killed_past_its_queue_deadline_completes(pools: PoolFactory, ledger: Ledger) -> None:
    pool = _start(pools, ledger, "latecast")
    handle = pool.client.cast("latecast", "c1", 3.0, op="work", timeout=1, call_timeout=10)
    killed = _kill_when_started(pool, ledger, "c1", after=1.5)
    assert handle.result(timeout=30)["pid"] != killed
    assert ledger.count("done")["c1"] == 1 and ledger.count("start")["c1"] == 2
