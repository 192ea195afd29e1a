"""Status and memory limits tell the truth right after a fault (defect 10).

A killed agent leaves the status at once (its node reaps it), not after its
heartbeat's TTL; the agents of a lost node show as ``lost`` once their
heartbeat is late. An agent over ``max_memory_mb`` that teardown cannot bring
back under it serves only until its replacement is warm, then its process is
retired: its memory stops growing within the time of one setup, and no call
waits for a cold start.
"""

from __future__ import annotations

import os
import signal
import time

from poolq.testing import PoolFactory
from tests.reliability.agents import Ledger
from tests.reliability.conftest import AGENT, kill_node


def test_a_killed_agent_leaves_the_status_at_once(pools: PoolFactory, ledger: Ledger) -> None:
    pool = pools.start("reaped", AGENT, size=2, options={"ledger": str(ledger.path)})
    handle = pool.client.cast("reaped", "m1", 3.0, op="work")
    pool.wait_for(lambda: ledger.count("start")["m1"] == 1, timeout=10, what="call running")
    [pid] = ledger.pids("start", "m1")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    pool.wait_for(lambda: pid not in {a.pid for a in pool.client.status("reaped").agents}, timeout=5, what="reaped")
    assert time.monotonic() - killed < 1.5  # not the heartbeat's 6 s
    assert handle.result(timeout=30)["marker"] == "m1"


def test_a_lost_nodes_agents_show_as_lost(pools: PoolFactory, ledger: Ledger) -> None:
    pool = pools.start("gone", AGENT, size=2, options={"ledger": str(ledger.path)})
    pool.client.cast("gone", "m1", 5.0, op="work")
    pool.wait_for(lambda: ledger.count("start")["m1"] == 1, timeout=10, what="call running")
    worker = pool.workers.pop()
    agents = {a.id for a in pool.client.status("gone").agents if a.node == worker.node}
    assert len(agents) == 2  # the node's whole size
    kill_node(worker)
    killed = time.monotonic()
    # Every agent the node had is shown, and shown lost (an empty list would not do)
    pool.wait_for(
        lambda: {a.id: a.state for a in pool.client.status("gone").agents} == dict.fromkeys(agents, "lost"),
        timeout=8,
        what="the node's 2 agents lost",
    )
    status = pool.client.status("gone")
    assert status.in_use == 0 and status.available == 0 and status.state == "degraded"
    print(f"lost node: its agents shown lost {time.monotonic() - killed:.1f}s after the kill")


def test_an_agent_over_its_memory_limit_is_replaced_warm_first(pools: PoolFactory, ledger: Ledger) -> None:
    probe = pools.start("mem", AGENT, size=1, options={"ledger": str(ledger.path)})
    probe.wait_for(lambda: bool(probe.agents() and probe.agents()[0].rss_mb), timeout=10, what="rss")
    baseline = probe.agents()[0].rss_mb
    probe.workers.pop().stop()
    pool = pools.start(
        "mem", AGENT, size=1, max_memory_mb=baseline + 40, options={"ledger": str(ledger.path), "setup_seconds": 1}
    )
    # Given an agent that leaks past the limit, out of teardown's reach
    leaky = pool.client.call("mem", 80, op="leak")
    asked = time.monotonic()
    # Then it serves only while its replacement sets up (1 s), and its process is retired once that one is warm
    served = []
    while leaky in {a.pid for a in pool.client.status("mem").agents} and time.monotonic() - asked < 15:
        served.append(pool.client.call("mem", f"after{len(served)}", op="work", timeout=10)["pid"])
    gone = time.monotonic() - asked
    assert leaky not in {a.pid for a in pool.client.status("mem").agents}
    assert gone < 1 + 4  # the replacement's setup, and a little
    assert pool.client.call("mem", "next")["pid"] != leaky
    print(
        f"leaking agent retired {gone:.1f}s after it crossed the limit, having served {served.count(leaky)} calls more"
    )
