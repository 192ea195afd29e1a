"""F22: a pool's events reach the observers a user subscribes (``POOLQ_OBSERVERS``), and its log."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis

from poolq import AgentError, PoolDegraded, UnknownOperation, events
from poolq.testing import PoolFactory, RunningPool
from tests.observers import read

AGENT = "tests.agents:Probe"


def _wait_for(path: Path, hook: str, count: int = 1, timeout: float = 20.0, **fields: Any) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in read(path, hook) if all(e.get(k) == v for k, v in fields.items())]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"{count} {hook} {fields} events; heard: {read(path)}"
        time.sleep(0.1)


def _observed(poolq_pools: PoolFactory, tmp_path: Path, name: str, **keys: Any) -> tuple[RunningPool, Path]:
    path = tmp_path / f"{name}.events.jsonl"
    env = {"POOLQ_OBSERVERS": "tests.observers:FileObserver", "POOLQ_TEST_EVENTS": str(path)}
    return poolq_pools.start(name, AGENT, env=env, **keys), path


def test_calls_leases_and_recycles_are_events(poolq_pools: PoolFactory, poolq_broker: str, tmp_path: Path) -> None:
    pool, path = _observed(
        poolq_pools, tmp_path, "evcalls", size=1, max_overflow=1, max_requests=4, recycle_jitter=0,
        options={"redis_url": poolq_broker},
    )  # fmt: skip
    client = pool.client
    answer = client.call("evcalls", marker="m1")
    with pytest.raises(AgentError):
        client.call("evcalls", "boom", op="fail")
    with pytest.raises(UnknownOperation):
        client.call("evcalls", op="nosuch")

    started = _wait_for(path, "call_started", 2)
    assert {e["op"] for e in started} == {"handle", "fail"}
    assert all(e["pool"] == "evcalls" and e["agent"] == answer["agent"] and e["queued_s"] >= 0 for e in started)
    ok = _wait_for(path, "call_succeeded")[0]
    assert ok["op"] == "handle" and ok["agent"] == answer["agent"] and ok["duration_s"] >= 0
    failed = {e["op"]: e for e in _wait_for(path, "call_failed", 2)}
    assert failed["fail"]["kind"] == "agent" and failed["fail"]["error_type"] == "ValueError"
    assert failed["fail"]["ran"] and failed["fail"]["message"] == "boom"
    assert failed["nosuch"]["kind"] == "unknown_operation" and not failed["nosuch"]["ran"]

    # A lease: one start, one end with its calls.
    with client.lease("evcalls") as agent:
        agent.call(marker="l1")
    lease_started = _wait_for(path, "lease_started")[0]
    ended = _wait_for(path, "lease_ended")[0]
    assert ended["lease_id"] == lease_started["lease_id"] and ended["ended"] == "released"
    assert ended["calls"] == 1 and not ended["broken"]

    client.call("evcalls", marker="m2")
    # The 4th request (handle, fail, the lease's, this one) reaches max_requests:
    # a warm replacement (prefork), told by the node.
    recycled = _wait_for(path, "agent_recycled", timeout=30)[0]
    assert recycled["trigger"] == "max_requests" and recycled["warm"] is True
    assert recycled["agent"] == answer["agent"]
    assert "trigger=max_requests" in pool.workers[0].log()  # the log line of the same event


def test_node_scaling_is_an_event(poolq_pools: PoolFactory, poolq_broker: str, tmp_path: Path) -> None:
    pool, path = _observed(
        poolq_pools, tmp_path, "evscale", size=1, max_overflow=1, options={"redis_url": poolq_broker}
    )
    node = pool.workers[0].node
    replies = pool.client.app.control.pool_grow(1, destination=[node], reply=True, timeout=5)
    assert replies and "ok" in next(iter(replies[0].values())), replies
    scaled = _wait_for(path, "pool_scaled")[0]
    assert (scaled["node"], scaled["direction"], scaled["before"], scaled["after"]) == (node, "up", 1, 2)
    assert scaled["reason"] == "remote control"


def test_degraded_and_recovered_are_events(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis, tmp_path: Path
) -> None:
    state.set("test:evbreak:fail_setup", 1)
    try:
        pool, path = _observed(
            poolq_pools, tmp_path, "evbreak", size=1, breaker_failures=1, breaker_reset=1,
            options={"redis_url": poolq_broker}, wait=False,
        )  # fmt: skip
        degraded = _wait_for(path, "pool_degraded", timeout=60)[0]
        assert "setup failed on purpose" in degraded["error"]
    finally:
        state.delete("test:evbreak:fail_setup")
    # Half-open after breaker_reset: the next call sets the agent up, and the pool recovers.
    deadline = time.monotonic() + 30
    while True:
        try:
            pool.client.call("evbreak", marker="back", timeout=5)
            break
        except PoolDegraded:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    _wait_for(path, "pool_recovered")


def test_an_observer_hears_events_in_process_and_one_that_raises_is_ignored() -> None:
    heard: list[events.Event] = []

    class Loud(events.Observer):
        def pool_scaled(self, event: events.PoolScaled) -> None:
            heard.append(event)

    class Broken(events.Observer):
        def handle(self, event: events.Event) -> None:
            raise RuntimeError("observer bug")

    loud, broken = Loud(), Broken()
    events.subscribe(broken)
    events.subscribe(loud)
    try:
        event = events.PoolScaled("p", node="n", direction="up", before=1, after=2, reason="test")
        events.emit(event)
        events.emit(events.PoolRecovered("p"))  # a hook Loud does not override: nothing happens
    finally:
        events.unsubscribe(broken)
        events.unsubscribe(loud)
    assert heard == [event]


def test_observers_are_named_by_import_path() -> None:
    from poolq import ConfigError

    with pytest.raises(ConfigError, match="cannot import"):
        events.load(["tests.nosuchmodule:Nothing"])
    with pytest.raises(ConfigError, match=r"not a poolq\.Observer"):
        events.load(["tests.agents:Probe"])
