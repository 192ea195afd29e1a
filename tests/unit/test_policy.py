"""F14, F15, F17: the maintenance policy, driven step by step over snapshots (no broker, no sleeping)."""

from __future__ import annotations

from typing import Any

import pytest

from poolq import PoolConfig
from poolq.scaling.policy import AgentView, Decision, PoolView, Scale, decide, jittered


def pool(**keys: Any) -> PoolConfig:
    base = {"name": "p", "agent": "a:B", "min_size": 1, "max_size": 4, "maintenance_interval": 10}
    merged = {**base, **keys}
    merged.setdefault("size", merged["min_size"])
    return PoolConfig.model_validate(merged)


def agents(idle: int = 0, busy: int = 0, leased: int = 0, **other: int) -> list[AgentView]:
    out = []
    for state, count in {"idle": idle, "busy": busy, "leased": leased, **other}.items():
        out += [AgentView(id=f"p@h:{state}{i}", node="n1", state=state, age_s=100.0) for i in range(count)]
    return out


def view(target: int, nodes: int = 1, waiting: int = 0, **counts: int) -> PoolView:
    return PoolView(target=target, nodes=nodes, agents=agents(**counts), waiting=waiting)


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        # (target, idle, busy, waiting) -> new target or None
        ((1, 0, 1, 199), 4),  # a burst: straight to max, not one step at a time
        ((1, 0, 1, 1), 3),  # demand 2 at 80% per agent -> 3
        ((2, 0, 2, 0), 3),  # 100% busy, nothing waits: one more
        ((2, 1, 1, 0), None),  # 50%: inside the band
        ((4, 0, 4, 10), None),  # at max already
        ((1, 1, 0, 0), None),  # idle at min: stays
        ((3, 0, 0, 0), None),  # idle but not yet for idle_timeout
    ],
)
def test_scale_up_decisions(current: tuple[int, int, int, int], expected: int | None) -> None:
    target, idle, busy, waiting = current
    decision = decide(pool(), view(target, waiting=waiting, idle=idle, busy=busy), now=1000.0)
    assert (decision.scale.target if decision.scale else None) == expected


def test_leased_agents_count_as_in_use() -> None:
    decision = decide(pool(), view(2, leased=2), now=1000.0)
    assert decision.scale == Scale(3, "up", "utilization 100% with 0 waiting")


def test_scale_up_respects_its_cooldown() -> None:
    busy = PoolView(target=2, nodes=1, agents=agents(busy=2), waiting=5, last_up_at=995.0)
    assert decide(pool(), busy, now=1000.0).scale is None  # 5 s after the last scale-up; cooldown is 10 s
    assert decide(pool(), busy, now=1006.0).scale is not None


def test_scale_down_needs_a_quiet_idle_timeout_and_goes_one_step() -> None:
    config = pool(idle_timeout=60)
    quiet = view(4, idle=4)
    first = decide(config, quiet, now=1000.0)
    assert first.scale is None and first.underused_since == 1000.0
    still = PoolView(target=4, nodes=1, agents=agents(idle=4), waiting=0, underused_since=1000.0)
    assert decide(config, still, now=1030.0).scale is None
    down = decide(config, still, now=1061.0)
    assert down.scale == Scale(3, "down", "utilization 0% for 61s")


def test_work_resets_the_quiet_clock() -> None:
    busy_again = PoolView(target=4, nodes=1, agents=agents(idle=3, busy=1), waiting=0, underused_since=1000.0)
    assert decide(pool(idle_timeout=60), busy_again, now=1100.0).underused_since is None


def test_never_below_min_or_above_max() -> None:
    config = pool(min_size=2, max_size=3, idle_timeout=1)
    quiet = PoolView(target=2, nodes=1, agents=agents(idle=2), waiting=0, underused_since=0.0)
    assert decide(config, quiet, now=1000.0).scale is None
    flooded = view(3, busy=3, waiting=100)
    assert decide(config, flooded, now=1000.0).scale is None


def test_bounds_changed_under_a_running_pool_are_applied() -> None:
    assert decide(pool(min_size=2), view(1, idle=1), now=1000.0).scale == Scale(2, "up", "size bounds are 2..4")
    assert decide(pool(max_size=2), view(3, idle=3), now=1000.0).scale == Scale(2, "down", "size bounds are 1..2")


def test_several_nodes_share_the_demand() -> None:
    two_nodes = PoolView(target=1, nodes=2, agents=agents(busy=2), waiting=6, last_up_at=None)
    assert decide(pool(), two_nodes, now=1000.0).scale == Scale(4, "up", "utilization 100% with 6 waiting")
    # demand 8 at 80% over 2 nodes = 5 per node, capped at max_size 4


def test_no_nodes_no_scaling() -> None:
    assert decide(pool(), PoolView(target=1, nodes=0, agents=[], waiting=10), now=1000.0).scale is None


def test_no_flapping_on_alternating_load() -> None:
    """A load that swings between busy and idle every run moves the target a few times, not every run."""
    config = pool(max_size=4, idle_timeout=60, maintenance_interval=10)
    state: dict[str, Any] = {"target": 1, "last_up_at": None, "last_down_at": None, "underused_since": None}
    changes = 0
    for step in range(60):  # ten minutes of runs every 10 s
        now = 1000.0 + 10 * step
        target = state["target"]
        busy = step % 2 == 0
        agents_now = agents(busy=target) if busy else agents(idle=target)
        decision = decide(config, PoolView(nodes=1, agents=agents_now, waiting=3 if busy else 0, **state), now)
        state["underused_since"] = decision.underused_since
        if decision.scale:
            changes += 1
            state["target"] = decision.scale.target
            state[f"last_{decision.scale.direction}_at"] = now
    assert state["target"] == 4
    assert changes <= 4  # climbed to max, and the idle half-minutes never added up to a scale-down


def test_replace_one_idle_agent_at_a_time() -> None:
    config = pool(max_age=50, recycle_jitter=0)
    old = [AgentView(id=f"p@h:{i}", node="n1", state="idle", age_s=100) for i in range(3)]
    decision = decide(config, PoolView(target=3, nodes=1, agents=old, waiting=0), now=1000.0)
    assert [r.agent_id for r in decision.replace] == ["p@h:0"]
    replacing = [AgentView(id="p@h:0", node="n1", state="idle", age_s=100, replacing=True), *old[1:]]
    assert decide(config, PoolView(target=3, nodes=1, agents=replacing, waiting=0), now=1000.0).replace == []


@pytest.mark.parametrize(
    ("agent", "keys", "reason"),
    [
        (AgentView("a", "n", "unhealthy", 1), {}, "health: failed its health check"),
        (AgentView("a", "n", "failed", 1), {}, "setup: its setup failed"),
        (AgentView("a", "n", "idle", 1, rss_mb=900), {"max_memory_mb": 512}, "max_memory: 900 MB (limit 512 MB)"),
        (AgentView("a", "n", "idle", 120), {"max_age": 60, "recycle_jitter": 0}, "max_age: 120s old (limit 60s)"),
    ],
)
def test_replacement_reasons(agent: AgentView, keys: dict[str, Any], reason: str) -> None:
    decision = decide(pool(**keys), PoolView(target=1, nodes=1, agents=[agent], waiting=0), now=0.0)
    assert decision.replace[0].reason == reason


def test_busy_agents_are_not_replaced_by_maintenance() -> None:
    busy = AgentView("a", "n", "busy", 999, rss_mb=9999)
    assert decide(pool(max_age=1, max_memory_mb=1), PoolView(1, 1, [busy], 0), now=0.0).replace == []


def test_jitter_spreads_limits_and_is_stable_per_agent() -> None:
    limits = {jittered(100.0, 0.2, f"agent-{i}") for i in range(50)}
    assert all(80.0 <= limit <= 100.0 for limit in limits)
    assert len(limits) > 40
    assert jittered(100.0, 0.2, "agent-7") == jittered(100.0, 0.2, "agent-7")


def test_decision_defaults() -> None:
    assert Decision().scale is None and Decision().replace == []
