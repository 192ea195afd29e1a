"""A node lost mid-burst (SIGKILL of its process group) or stopped (SIGTERM): no call lost or run twice.

A SIGKILLed node cannot say goodbye: its calls stay taken-but-unacknowledged
in the broker. Live nodes renew theirs every heartbeat; a dead node's are
handed back ``redelivery_timeout`` (10 s) after its last heartbeat, by the
sweep every node runs every 2 s. The bound checked here: every call of the
burst completes within 20 s of the node's return (the calls run 1 s each).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from poolq import Handle
from poolq.testing import PoolFactory, RunningPool
from tests.reliability.agents import Ledger
from tests.reliability.conftest import AGENT, kill_node

#: Seconds within which the burst must have completed after the lost node is back.
RECOVERY_BOUND = 20.0


def _burst(
    pool: RunningPool, calls: int, casts: int, seconds: float
) -> tuple[list[threading.Thread], dict[str, Any], list[Handle]]:
    results: dict[str, Any] = {}

    def caller(i: int) -> None:
        try:
            results[f"call{i}"] = pool.client.call(
                pool.name, f"call{i}", seconds, op="work", timeout=60, call_timeout=30
            )
        except Exception as exc:
            results[f"call{i}"] = exc

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(calls)]
    for thread in threads:
        thread.start()
    handles = [pool.client.cast(pool.name, f"cast{i}", seconds, op="work", call_timeout=30) for i in range(casts)]
    return threads, results, handles


def _join(threads: list[threading.Thread], results: dict[str, Any], deadline: float) -> None:
    """Join the burst's callers by ``deadline`` (monotonic): every one ended, and each left its result."""
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not [thread.name for thread in threads if thread.is_alive()], results
    assert set(results) == {f"call{i}" for i in range(len(threads))}, results


def _exactly_once(ledger: Ledger, markers: list[str]) -> None:
    done = ledger.count("done")
    assert {m: done[m] for m in markers} == dict.fromkeys(markers, 1)


def test_a_node_killed_mid_burst_loses_nothing(pools: PoolFactory, ledger: Ledger) -> None:
    pool = pools.start("lost", AGENT, size=3, options={"ledger": str(ledger.path)})
    threads, results, handles = _burst(pool, calls=6, casts=6, seconds=1.0)
    pool.wait_for(lambda: len(ledger.count("start")) >= 3, timeout=10, what="calls running")

    # When the whole node is SIGKILLed mid-burst, and a node comes back
    kill_node(pool.workers.pop())
    time.sleep(1.0)
    pools.add_node(pool)
    back = time.monotonic()

    # Then every call and cast completes, exactly once, within the bound
    _join(threads, results, back + RECOVERY_BOUND)
    casts = [handle.result(timeout=max(1.0, RECOVERY_BOUND - (time.monotonic() - back))) for handle in handles]
    recovery = time.monotonic() - back
    assert all(isinstance(r, dict) for r in results.values()), results
    assert [c["marker"] for c in casts] == [f"cast{i}" for i in range(6)]
    _exactly_once(ledger, [f"call{i}" for i in range(6)] + [f"cast{i}" for i in range(6)])
    print(f"node SIGKILL: burst completed {recovery:.1f}s after the node was back")
    assert recovery < RECOVERY_BOUND


def test_a_node_killed_mid_call_is_noticed_by_another_node(pools: PoolFactory, ledger: Ledger) -> None:
    # Given two nodes, one of them running a call
    pool = pools.start("twin", AGENT, size=1, nodes=2, options={"ledger": str(ledger.path)})
    handle = pool.client.cast("twin", "m1", 1.0, op="work", call_timeout=30)
    pool.wait_for(lambda: ledger.count("start")["m1"] == 1, timeout=10, what="call running")
    [pid] = ledger.pids("start", "m1")
    victim = next(
        w for w in pool.workers if any(a.pid == pid and a.node == w.node for a in pool.client.status("twin").agents)
    )
    killed_at = time.monotonic()
    # When that node is SIGKILLed
    pool.workers.remove(victim)
    kill_node(victim)
    # Then the other node takes the call over once the dead node's hold on it lapsed
    assert handle.result(timeout=25)["pid"] != pid
    recovery = time.monotonic() - killed_at
    print(f"node SIGKILL with a live twin: call completed {recovery:.1f}s after the kill")
    assert recovery < 16  # redelivery_timeout (10 s) + a sweep (2 s) + the rerun (1 s)
    _exactly_once(ledger, ["m1"])


def test_a_node_stopped_mid_burst_finishes_in_flight_calls_and_leaves_the_rest(
    pools: PoolFactory, ledger: Ledger
) -> None:
    pool = pools.start("stopped", AGENT, size=2, options={"ledger": str(ledger.path)})
    threads, results, handles = _burst(pool, calls=4, casts=8, seconds=0.5)
    pool.wait_for(lambda: len(ledger.count("start")) >= 2, timeout=10, what="calls running")
    # When the node gets SIGTERM (warm shutdown) mid-burst
    worker = pool.workers.pop()
    worker.process.send_signal(signal.SIGTERM)
    assert worker.stop(timeout=30) == 0
    # Then what it started finished; the rest waits, and a new node runs it: all exactly once
    assert set(ledger.count("start")) == set(ledger.count("done"))
    pools.add_node(pool)
    _join(threads, results, time.monotonic() + 30)
    assert [h.result(timeout=30)["marker"] for h in handles] == [f"cast{i}" for i in range(8)]
    assert all(isinstance(r, dict) for r in results.values()), results
    _exactly_once(ledger, [f"call{i}" for i in range(4)] + [f"cast{i}" for i in range(8)])
