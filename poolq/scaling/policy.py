"""The maintenance policy: what to do with a pool, as a pure function of what is running.

:func:`decide` takes a :class:`PoolView` (built from one registry snapshot and
the queue depth), the pool's configuration and the time, and returns the
actions; it does no I/O, so tests drive it step by step without sleeping.
:mod:`poolq.scaling.maintenance` turns the actions into registry writes and remote
control commands.

Scaling moves each node's base size (``target``) between ``min_size`` and
``max_size``:

- up when utilization (busy and leased agents over serving agents) is above
  ``scale_up_at`` or calls wait, straight to the size the demand needs, at most
  once per ``up_cooldown``;
- down by one when utilization is below ``scale_down_at``, nothing waits, and
  the pool has been underused for ``idle_timeout`` (which is also the time
  between two scale-downs and after a scale-up), so it never flaps.

Recycling finds idle agents past ``max_age`` (jittered per agent), over
``max_memory_mb``, unhealthy, or failed, and replaces one at a time per pool,
never while another replacement is under way: never below the warm minimum at
once. Busy agents recycle themselves after their current call.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

from ..config import PoolConfig


@dataclass(frozen=True)
class AgentView:
    """What the policy needs to know of one agent."""

    id: str
    node: str
    state: str
    age_s: float
    rss_mb: float = 0.0
    replacing: bool = False


@dataclass(frozen=True)
class PoolView:
    """A pool as the policy sees it."""

    target: int
    nodes: int
    agents: list[AgentView]
    waiting: int
    last_up_at: float | None = None
    last_down_at: float | None = None
    underused_since: float | None = None

    @property
    def serving(self) -> int:
        return sum(1 for a in self.agents if a.state in ("idle", "busy", "leased"))

    @property
    def in_use(self) -> int:
        return sum(1 for a in self.agents if a.state in ("busy", "leased"))

    @property
    def utilization(self) -> float:
        if self.serving:
            return self.in_use / self.serving
        return 1.0 if self.waiting else 0.0


@dataclass(frozen=True)
class Scale:
    """Set every node's base size to ``target``."""

    target: int
    direction: str
    reason: str


@dataclass(frozen=True)
class Replace:
    """Replace an idle agent by a fresh one (the new one is warm before the old one leaves)."""

    agent_id: str
    reason: str


@dataclass(frozen=True)
class Decision:
    """The actions for this run, and the history to remember for the next."""

    scale: Scale | None = None
    replace: list[Replace] = field(default_factory=list)
    underused_since: float | None = None


def decide(pool: PoolConfig, view: PoolView, now: float) -> Decision:
    """What maintenance should do with ``pool`` now."""
    scale, underused_since = _scale(pool, view, now)
    return Decision(scale=scale, replace=_replace(pool, view), underused_since=underused_since)


def _scale(pool: PoolConfig, view: PoolView, now: float) -> tuple[Scale | None, float | None]:
    if view.nodes == 0:
        return None, None
    target = min(max(view.target, pool.min_size), pool.max_size)
    utilization = view.utilization
    busy = utilization > pool.scale_up_at or view.waiting > 0
    underused = utilization < pool.scale_down_at and view.waiting == 0
    underused_since = (view.underused_since or now) if underused else None

    if target != view.target:  # the bounds changed under a running pool
        direction = "up" if target > view.target else "down"
        return Scale(target, direction, f"size bounds are {pool.min_size}..{pool.max_size}"), underused_since
    if busy and target < pool.max_size and _since(now, view.last_up_at) >= pool.up_cooldown:
        demand = view.in_use + view.waiting
        wanted = math.ceil(demand / pool.scale_up_at / view.nodes)
        new = min(max(target + 1, wanted), pool.max_size)
        reason = f"utilization {utilization:.0%} with {view.waiting} waiting"
        return Scale(new, "up", reason), underused_since
    if (
        underused
        and target > pool.min_size
        and underused_since is not None
        and now - underused_since >= pool.idle_timeout
        and _since(now, view.last_down_at) >= pool.idle_timeout
        and _since(now, view.last_up_at) >= pool.idle_timeout
    ):
        reason = f"utilization {utilization:.0%} for {now - underused_since:.0f}s"
        return Scale(target - 1, "down", reason), None
    return None, underused_since


def _replace(pool: PoolConfig, view: PoolView) -> list[Replace]:
    if any(a.replacing or a.state in ("starting", "recycling") for a in view.agents):
        return []  # one replacement at a time keeps the warm minimum
    candidates: list[Replace] = []
    for agent in view.agents:
        if agent.state == "unhealthy":
            candidates.append(Replace(agent.id, "health: failed its health check"))
        elif agent.state == "failed":
            candidates.append(Replace(agent.id, "setup: its setup failed"))
        elif agent.state != "idle":
            continue
        elif pool.max_memory_mb is not None and agent.rss_mb > pool.max_memory_mb:
            candidates.append(Replace(agent.id, f"max_memory: {agent.rss_mb:.0f} MB (limit {pool.max_memory_mb:g} MB)"))
        elif pool.max_age is not None and agent.age_s > jittered(pool.max_age, pool.recycle_jitter, agent.id):
            candidates.append(Replace(agent.id, f"max_age: {agent.age_s:.0f}s old (limit {pool.max_age:g}s)"))
    return candidates[:1]


def jittered(limit: float, jitter: float, key: str) -> float:
    """``limit`` lowered by up to ``jitter`` (a fraction), by a fixed amount per ``key``.

    The same agent always gets the same limit; different agents get different
    ones, so agents started together do not all recycle together.
    """
    fraction = (zlib.crc32(key.encode()) % 10_000) / 10_000
    return limit * (1 - jitter * fraction)


def _since(now: float, moment: float | None) -> float:
    return math.inf if moment is None else now - moment
