"""Time limits hold against agents that hang or ignore them (defects 7 and 8).

``setup_timeout``: a hanging setup is interrupted at the limit (or its process
ended a second later when it ignores the interruption), counted by the
circuit breaker, and tried again with backoff; a slow setup within the limit
still comes up. ``call_timeout``: an agent that swallows the interruption is
ended a second past the limit, and its caller never waits longer than
``timeout + call_timeout + 2`` seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from poolq import AgentUnavailable, CallTimeout, CheckoutTimeout, PoolDegraded
from poolq.store.protocol import CALL_GRACE
from poolq.testing import PoolFactory, RunningPool
from tests.reliability.agents import Ledger
from tests.reliability.conftest import AGENT


def _call_until(pool: RunningPool, ok: type[BaseException] | None, timeout: float) -> object:
    """Call until the pool answers (or raises ``ok``); what it answered."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return pool.client.call(pool.name, "probe", timeout=5)
        except (AgentUnavailable, PoolDegraded, CheckoutTimeout) as exc:
            # No agent up (setups ended and retried) or none set up: typed answers, while it lasts
            if ok is not None and isinstance(exc, ok):
                return exc
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.mark.parametrize("stubborn", [False, True], ids=["interrupted", "ended"])
def test_a_hanging_setup_is_stopped_counted_and_retried(
    pools: PoolFactory, ledger: Ledger, tmp_path: Path, stubborn: bool
) -> None:
    hang = tmp_path / "hang"
    hang.touch()
    started = time.monotonic()
    # Given a setup that hangs (and, stubborn, ignores its interruption)
    pool = pools.start(
        "hangs", AGENT, size=1, setup_timeout=1.5, breaker_failures=2, breaker_window=60, breaker_reset=3,
        options={"ledger": str(ledger.path), "hang_while": str(hang), "stubborn": stubborn},
    )  # fmt: skip
    # Then it is stopped at the limit: its agent fails with the setup error (its process ended if stubborn)
    assert time.monotonic() - started < 1.5 + 1 + 3
    [agent] = pool.client.status("hangs").agents
    assert agent.state == "failed" and "setup_timeout" in agent.error
    # And counted by the breaker: calls fail fast with the setup error, without waiting out the hang
    degraded = _call_until(pool, PoolDegraded, timeout=20)
    assert isinstance(degraded, PoolDegraded) and "setup_timeout" in str(degraded)
    assert pool.client.status("hangs").state == "degraded"

    # When setup works again, the pool recovers once the breaker lets calls try (backoff, not a hot loop)
    hang.unlink()
    assert _call_until(pool, None, timeout=30)["marker"] == "probe"  # type: ignore[index]
    assert len([row for row in ledger.lines() if row[0] == "setup"]) <= 8, "setup was retried in a hot loop"
    if stubborn:
        assert "did not stop when interrupted" in pool.workers[0].log()


def test_a_slow_setup_within_its_limit_comes_up(pools: PoolFactory, ledger: Ledger) -> None:
    # The limit is poolq's, not Celery's 4 s process start-up timeout: a 6 s setup comes up
    pool = pools.start(
        "slowsetup", AGENT, size=1, setup_timeout=10, options={"ledger": str(ledger.path), "setup_seconds": 6}
    )
    assert pool.client.call("slowsetup", "m1")["marker"] == "m1"
    assert len([row for row in ledger.lines() if row[0] == "setup"]) == 1


@pytest.mark.parametrize("worker_pool", ["prefork", "solo"])
def test_an_agent_that_swallows_exceptions_is_interrupted_at_call_timeout(
    pools: PoolFactory, ledger: Ledger, worker_pool: str
) -> None:
    pool = pools.start("swallow", AGENT, size=1, worker_pool=worker_pool, options={"ledger": str(ledger.path)})
    started = time.monotonic()
    # ``except Exception`` around its work does not catch poolq's interruption
    with pytest.raises(CallTimeout):
        pool.client.call("swallow", "m1", 20.0, op="swallow", timeout=5, call_timeout=1)
    assert time.monotonic() - started < 1 + CALL_GRACE
    assert ledger.count("done")["m1"] == 0
    assert pool.client.call("swallow", "next")["marker"] == "next"


def test_an_agent_that_ignores_its_interruption_is_ended(pools: PoolFactory, ledger: Ledger) -> None:
    pool = pools.start("stubborn", AGENT, size=1, options={"ledger": str(ledger.path)})
    timeout, call_timeout = 5, 1
    started = time.monotonic()
    # Given an agent that catches even BaseException and keeps working
    with pytest.raises(CallTimeout):
        pool.client.call("stubborn", "m1", 20.0, op="stubborn", timeout=timeout, call_timeout=call_timeout)
    waited = time.monotonic() - started
    # Then the worker ends its process a second past the limit, and the caller heard CallTimeout in time
    assert waited < timeout + call_timeout + CALL_GRACE
    assert waited < call_timeout + 1 + 1  # the worker's own reply, not the caller's deadline
    [killed] = ledger.pids("start", "m1")
    # A fresh process serves the next call, and the stuck call is never run again
    assert pool.client.call("stubborn", "next", timeout=15)["pid"] != killed
    time.sleep(1)
    assert ledger.count("start")["m1"] == 1
