"""How many agent processes a prefork node runs, and which it replaces: the decisions, no I/O.

A node keeps itself at

    base      (set by beat's maintenance, between min_size and max_size)
    + overflow (0 .. max_overflow, while every agent is busy and calls wait)

and replaces agents, warm first: it grows a new process, waits until its
agent is set up, then retires the old one (between two of its calls). One
replacement at a time per node.

:func:`step` looks at the node once (:class:`NodeView`) and says what to do
next (an action); :class:`NodePlan` is what it remembers between steps. The
adapter (:mod:`poolq.worker.scaler`) reads the view from billiard and carries
the actions out. Tests drive :func:`step` with ``now``, without sleeping.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import PoolConfig


@dataclass
class Replacement:
    """Replace process ``pid``: a new process first, then the old one leaves once the new one is warm."""

    pid: int
    agent_id: str
    reason: str
    slot: str = ""
    recycles: int = 0
    grown: bool = False
    new_pids: set[int] = field(default_factory=set)


@dataclass
class NodePlan:
    """What a node's scaler remembers between two steps."""

    base: int
    #: When the node last needed every process it has (monotonic).
    last_needed: float = 0.0
    #: When it may ask maintenance to scale up again, at the earliest.
    next_request: float = 0.0
    queue: deque[Replacement] = field(default_factory=deque)
    replacing: Replacement | None = None

    def enqueue(self, job: Replacement) -> bool:
        """Queue a replacement, unless that process is already queued or being replaced; whether it was queued."""
        if any(j.pid == job.pid for j in (*self.queue, *([self.replacing] if self.replacing else []))):
            return False
        self.queue.append(job)
        return True

    def forget(self, pid: int) -> None:
        """A process died: drop what was planned for it."""
        self.queue = deque(j for j in self.queue if j.pid != pid)
        if self.replacing is not None and self.replacing.pid == pid:
            self.replacing = None


@dataclass(frozen=True)
class NodeView:
    """The node, as it is now."""

    processes: int
    #: Whether a process is still setting its agent up (not yet taking work).
    starting: bool
    #: Calls running now.
    active: int


@dataclass(frozen=True)
class Grow:
    count: int
    reason: str


@dataclass(frozen=True)
class Shrink:
    count: int
    reason: str


@dataclass(frozen=True)
class GrowReplacement:
    """Start the new process of a replacement (it takes ``job``'s slot over)."""

    job: Replacement


@dataclass(frozen=True)
class RetireReplaced:
    """The replacement is warm: retire the old process, now if idle, else when its call ends."""

    job: Replacement


@dataclass(frozen=True)
class RequestMaintenance:
    """Full, with work waiting, and the pool may grow: ask maintenance now rather than at beat's next tick."""


Action = Grow | Shrink | GrowReplacement | RetireReplaced | RequestMaintenance | None


def bounds(pool: PoolConfig, base: int) -> tuple[int, int]:
    """The fewest and the most processes a node of ``pool`` runs at base size ``base``."""
    return base, base + pool.max_overflow


def clamp_base(pool: PoolConfig, scaled: int) -> int:
    """A base size within the pool's bounds (min_size .. max_size)."""
    return min(max(scaled, pool.min_size), pool.max_size)


def step(plan: NodePlan, pool: PoolConfig, view: NodeView, now: float, waiting: Callable[[], int]) -> Action:
    """What the node should do now; ``waiting()`` (a queue length) is asked only when it matters."""
    if plan.replacing is None and plan.queue:
        plan.replacing = plan.queue.popleft()
    job = plan.replacing
    if job is not None:
        # Nothing else changes while a replacement runs.
        if view.starting:
            return None
        return RetireReplaced(job) if job.grown else GrowReplacement(job)
    if view.active > plan.base:
        plan.last_needed = now
    if view.starting:
        return None
    _, most = bounds(pool, plan.base)
    if view.processes < plan.base:
        # Up to the base size in one step: the burst that raised it waits.
        return Grow(plan.base - view.processes, f"base size {plan.base}")
    if view.active >= view.processes:
        queued = waiting()
        if queued and view.processes < most:
            plan.last_needed = now
            return Grow(1, f"all {view.processes} agents busy and {queued} calls waiting")
        if queued and plan.base < pool.max_size and now >= plan.next_request:
            plan.next_request = now + pool.maintenance_interval
            return RequestMaintenance()
        return None
    idle_before_shrink = pool.overflow_idle if pool.max_overflow else 0.0
    if view.processes > plan.base and now - plan.last_needed > idle_before_shrink:
        plan.last_needed = now  # one process at a time
        return Shrink(1, f"above base size {plan.base} and idle")
    return None


def resize_target(pool: PoolConfig, plan: NodePlan, processes: int, delta: int) -> tuple[int, str]:
    """Where a remote-control grow or shrink (Flower's buttons) may take the node: (target, why it stops there)."""
    least, most = bounds(pool, plan.base)
    target = min(max(processes + delta, least), most)
    limit = f"base {plan.base} + max_overflow {pool.max_overflow}" if delta > 0 else f"base {plan.base}"
    return target, limit
