"""Pool status: what the registry says is running, in one round trip.

The numbers follow poolboy's (Normandy, Jido): ``size`` base agents,
``overflow`` extra agents out of ``max_overflow``, ``available`` idle ones,
``in_use`` busy or leased ones, ``waiting`` calls in the queue, and a state:

- ``ready``: an agent is free, or overflow can still start one;
- ``overflow``: extra agents are running and overflow is not spent;
- ``full``: no agent is free and overflow is spent (new calls wait);
- ``degraded``: no agent can serve (none running, or every setup failed);
- ``closed``: the pool was stopped on purpose (``poolq stop``); calls fail at
  once with :class:`~poolq.errors.PoolClosed` until a node starts again;
- ``skipped``: no node runs it because its requirements (``requires``) are
  missing where its worker was to run; calls fail at once with PoolClosed.

An agent whose heartbeat is late shows as ``lost``: its process most likely
died (a killed node), and it counts as neither available nor in use.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from ..config import PoolConfig
from . import registry
from .records import IN_USE, SERVING, AgentRecord, NodeRecord

COUNTERS = ("requests", "recycles", "spawned", "terminated", "scale_ups", "scale_downs", "rate_delayed")


@dataclass(frozen=True)
class AgentInfo:
    """One agent as the registry sees it."""

    id: str
    name: str
    state: str
    node: str
    host: str
    pid: int
    requests: int
    age_s: float
    idle_s: float | None
    error: str = ""
    #: The agent's place in its node, kept across recycles, and how often it was recycled.
    slot: str = ""
    recycles: int = 0
    #: Why it is being replaced ('' when it is not).
    replacing: str = ""
    #: Why its slot is no longer recycled (past max_recycles; '' when it is).
    degraded: str = ""
    #: Its last lifecycle states, as (time, state), oldest first.
    history: list[tuple[float, str]] = field(default_factory=list)


@dataclass(frozen=True)
class NodeInfo:
    """One worker node (a ``poolq worker`` main process) of the pool."""

    id: str
    state: str
    host: str
    pid: int
    size: int
    max_overflow: int
    processes: int


@dataclass(frozen=True)
class PoolStatus:
    """A pool's state, counters and agents, across all of its worker nodes."""

    pool: str
    state: str
    size: int
    available: int
    in_use: int
    overflow: int
    max_overflow: int
    waiting: int
    starting: int
    failed: int
    counters: dict[str, int]
    #: Why the pool is degraded: the last setup error while the breaker is open.
    degraded_by: str
    last_scale: dict[str, Any] | None
    nodes: list[NodeInfo] = field(default_factory=list)
    #: Why no node runs the pool (its state is ``skipped``).
    skipped_because: str = ""
    agents: list[AgentInfo] = field(default_factory=list)
    #: The pool's ``rate_limit`` ('' for none); ``counters["rate_delayed"]``: calls that waited for it.
    rate_limit: str = ""

    @property
    def can_grow(self) -> bool:
        """Whether some node may still start an overflow agent."""
        return any(n.processes < n.size + n.max_overflow for n in self.nodes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_status(state: redis.Redis, pool: PoolConfig, waiting: int | None = None) -> PoolStatus:
    """The status of ``pool``; give ``waiting`` when the pool's queue is not in the state Redis."""
    snap = registry.snapshot(state, pool.name, pool.queue if waiting is None else "")
    if waiting is None:
        waiting = snap.waiting or 0
    return summarize(
        pool, snap.agents, snap.nodes, snap.stats, waiting=waiting, now=time.time(), server_time=snap.server_time
    )


def summarize(
    pool: PoolConfig,
    agents: list[AgentRecord],
    nodes: list[NodeRecord],
    stats: dict[str, str],
    waiting: int,
    now: float,
    server_time: float = 0.0,
) -> PoolStatus:
    """Turn registry records into a :class:`PoolStatus` (pure: tests call it directly).

    ``server_time`` is the state Redis's clock, which stamps the heartbeats.
    """
    node_infos = [
        NodeInfo(
            id=n.id,
            state=n.state,
            host=n.host,
            pid=n.pid,
            size=n.size or pool.size,
            max_overflow=n.max_overflow if n.size else pool.max_overflow,
            processes=n.processes,
        )
        for n in nodes
    ]
    agent_infos = [_agent(a, now, server_time) for a in agents]
    # Agents still starting (a new process, or a warm replacement) are not yet
    # capacity, and lost ones no longer: neither counts as size or overflow.
    present = [a for a in agent_infos if a.state not in ("starting", "lost")]
    size = overflow = 0
    for node in node_infos:
        count = sum(1 for a in present if a.node == node.id)
        size += min(count, node.size)
        overflow += max(0, count - node.size)
    size += sum(1 for a in present if a.node not in {n.id for n in node_infos})
    max_overflow = sum(n.max_overflow for n in node_infos)
    available = sum(1 for a in agent_infos if a.state == "idle")
    in_use = sum(1 for a in agent_infos if a.state in IN_USE)
    if stats.get("skipped") and not node_infos:
        state = "skipped"
    elif stats.get("closed") and not node_infos:
        state = "closed"
    elif registry.breaker_open(stats, now) or not any(a.state in SERVING for a in agent_infos):
        state = "degraded"
    elif available == 0 and overflow >= max_overflow:
        state = "full"
    elif overflow > 0:
        state = "overflow"
    else:
        state = "ready"
    last_scale = None
    if "last_scale_direction" in stats:
        last_scale = {k.removeprefix("last_scale_"): v for k, v in stats.items() if k.startswith("last_scale_")}
    return PoolStatus(
        pool=pool.name,
        state=state,
        size=size,
        available=available,
        in_use=in_use,
        overflow=overflow,
        max_overflow=max_overflow,
        waiting=waiting,
        starting=sum(1 for a in agent_infos if a.state in ("starting", "recycling")),
        failed=sum(1 for a in agent_infos if a.state == "failed"),
        degraded_by=stats.get("breaker_error", "") if registry.breaker_open(stats, now) else "",
        counters={name: _int(stats.get(name)) for name in COUNTERS},
        last_scale=last_scale,
        nodes=sorted(node_infos, key=lambda n: n.id),
        skipped_because=stats.get("skipped", "") if state == "skipped" else "",
        agents=sorted(agent_infos, key=lambda a: (a.node, a.name)),
        rate_limit=str(pool.rate or ""),
    )


def _agent(record: AgentRecord, now: float, server_time: float = 0.0) -> AgentInfo:
    state: str = record.state
    if record.beat_at and server_time and server_time - record.beat_at > registry.HEARTBEAT_STALE:
        state = "lost"  # its heartbeat stopped: its process is most likely dead
    started = record.started_at
    return AgentInfo(
        id=record.id,
        name=record.name,
        state=state,
        node=record.node,
        host=record.host,
        pid=record.pid,
        requests=record.requests,
        age_s=max(0.0, now - started) if started else 0.0,
        idle_s=max(0.0, now - (record.last_used_at or started)) if state == "idle" else None,
        error=record.error,
        slot=record.slot,
        recycles=record.recycles,
        replacing=record.replace,
        degraded=record.degraded,
        history=record.history,
    )


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(float(value)) if value not in (None, "") else default
    except ValueError:
        return default


def as_float(value: str | None) -> float:
    """A registry field as a float (0.0 when empty or not a number)."""
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0
