"""The node's decisions (poolq.scaling.node), step by step with ``now``: no process, no sleeping."""

from __future__ import annotations

from poolq.config import PoolConfig
from poolq.scaling.node import (
    Grow,
    GrowReplacement,
    NodePlan,
    NodeView,
    Replacement,
    RequestMaintenance,
    RetireReplaced,
    Shrink,
    clamp_base,
    resize_target,
    step,
)

POOL = PoolConfig(name="p", agent="a:B", size=2, max_overflow=1, overflow_idle=5, min_size=1, max_size=4)


def waiting(n: int) -> object:
    asked: list[int] = []

    def count() -> int:
        asked.append(n)
        return n

    count.asked = asked  # type: ignore[attr-defined]
    return count


def test_grows_to_its_base_size_in_one_step() -> None:
    plan = NodePlan(base=4)
    assert step(plan, POOL, NodeView(processes=1, starting=False, active=0), 0.0, lambda: 0) == Grow(3, "base size 4")


def test_waits_while_a_process_starts() -> None:
    plan = NodePlan(base=4)
    assert step(plan, POOL, NodeView(processes=1, starting=True, active=1), 0.0, lambda: 9) is None


def test_grows_into_overflow_only_when_full_with_calls_waiting() -> None:
    plan = NodePlan(base=2)
    idle = waiting(5)
    assert step(plan, POOL, NodeView(2, False, 1), 0.0, idle) is None  # type: ignore[arg-type]
    assert idle.asked == []  # type: ignore[attr-defined]  # not full: the queue is not even read
    assert step(plan, POOL, NodeView(2, False, 2), 0.0, lambda: 0) is None  # full, nothing waits
    grow = step(plan, POOL, NodeView(2, False, 2), 1.0, lambda: 3)
    assert grow == Grow(1, "all 2 agents busy and 3 calls waiting")
    assert plan.last_needed == 1.0


def test_overflow_spent_asks_maintenance_at_most_once_per_interval() -> None:
    plan = NodePlan(base=2)
    full = NodeView(3, False, 3)  # base 2 + max_overflow 1
    assert step(plan, POOL, full, 0.0, lambda: 4) == RequestMaintenance()
    assert step(plan, POOL, full, POOL.maintenance_interval / 2, lambda: 4) is None
    assert step(plan, POOL, full, POOL.maintenance_interval, lambda: 4) == RequestMaintenance()
    at_max = NodePlan(base=4)
    assert step(at_max, POOL, NodeView(5, False, 5), 0.0, lambda: 4) is None  # max_size reached


def test_overflow_retires_one_process_at_a_time_after_overflow_idle() -> None:
    plan = NodePlan(base=2, last_needed=10.0)
    quiet = NodeView(3, False, 0)
    assert step(plan, POOL, quiet, 14.0, lambda: 0) is None
    assert step(plan, POOL, quiet, 15.5, lambda: 0) == Shrink(1, "above base size 2 and idle")
    assert step(plan, POOL, quiet, 16.0, lambda: 0) is None  # the next one waits overflow_idle again
    assert step(plan, POOL, NodeView(2, False, 0), 30.0, lambda: 0) is None  # never below the base


def test_a_replacement_grows_first_then_retires_the_old_process_once_the_new_one_is_warm() -> None:
    plan = NodePlan(base=2)
    job = Replacement(pid=11, agent_id="p@h:11", reason="10 requests", slot="n/11", recycles=2)
    assert plan.enqueue(job) and not plan.enqueue(Replacement(pid=11, agent_id="", reason="again"))
    assert step(plan, POOL, NodeView(2, False, 2), 0.0, lambda: 9) == GrowReplacement(job)
    job.grown = True
    # While the new process sets up, the old agent serves on and nothing else changes
    assert step(plan, POOL, NodeView(3, True, 3), 1.0, lambda: 9) is None
    assert step(plan, POOL, NodeView(3, False, 3), 2.0, lambda: 9) == RetireReplaced(job)


def test_replacements_take_turns() -> None:
    plan = NodePlan(base=2)
    first, second = Replacement(1, "a", "age"), Replacement(2, "b", "age")
    plan.enqueue(first)
    plan.enqueue(second)
    assert step(plan, POOL, NodeView(2, False, 0), 0.0, lambda: 0) == GrowReplacement(first)
    first.grown = True
    assert step(plan, POOL, NodeView(3, False, 0), 1.0, lambda: 0) == RetireReplaced(first)
    plan.replacing = None  # the adapter retired it
    assert step(plan, POOL, NodeView(2, False, 0), 2.0, lambda: 0) == GrowReplacement(second)


def test_a_dead_process_is_forgotten() -> None:
    plan = NodePlan(base=2)
    plan.enqueue(Replacement(1, "a", "age"))
    plan.forget(1)
    assert step(plan, POOL, NodeView(2, False, 0), 0.0, lambda: 0) is None


def test_the_bounds_are_written_once() -> None:
    assert [clamp_base(POOL, n) for n in (0, 1, 3, 9)] == [1, 1, 3, 4]
    plan = NodePlan(base=2)
    assert resize_target(POOL, plan, 2, +5) == (3, "base 2 + max_overflow 1")
    assert resize_target(POOL, plan, 3, -5) == (2, "base 2")
