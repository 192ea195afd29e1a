"""The registry's records of agents and nodes, typed: parsed once from their Redis hashes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

#: What an agent is doing. ``lost`` is the status's word for an agent whose heartbeat is late.
AgentState = Literal[
    "starting", "idle", "busy", "leased", "recycling", "failed", "unhealthy", "degraded", "stopped", "lost", ""
]
#: Agents that can take work now.
SERVING: tuple[AgentState, ...] = ("idle", "busy", "leased")
#: Agents that have work now.
IN_USE: tuple[AgentState, ...] = ("busy", "leased")
NodeState = Literal["starting", "ready", ""]


@dataclass(frozen=True)
class AgentRecord:
    """One agent, as its process last published it."""

    id: str
    pool: str = ""
    name: str = ""
    state: AgentState = ""
    node: str = ""
    host: str = ""
    pid: int = 0
    started_at: float = 0.0
    last_used_at: float = 0.0
    requests: int = 0
    setups: int = 0
    #: The last setup error ('' when set up).
    error: str = ""
    #: Why its slot is no longer recycled ('' when it is).
    degraded: str = ""
    slot: str = ""
    recycles: int = 0
    history: list[tuple[float, str]] = field(default_factory=list)
    #: Why it is to be replaced ('' when it is not).
    replace: str = ""
    rss_mb: float = 0.0
    cpu_percent: float | None = None
    #: When its heartbeat was last stamped (the state Redis's clock).
    beat_at: float = 0.0
    #: The call it runs ('' when none).
    task: str = ""
    lease: str = ""

    @classmethod
    def parse(cls, agent_id: str, fields: Mapping[str, str]) -> AgentRecord:
        return cls(
            id=agent_id,
            pool=fields.get("pool", ""),
            name=fields.get("name") or agent_id,
            state=cast(AgentState, fields.get("state", "")),
            node=fields.get("node", ""),
            host=fields.get("host", ""),
            pid=_int(fields.get("pid")),
            started_at=_float(fields.get("started_at")),
            last_used_at=_float(fields.get("last_used_at")),
            requests=_int(fields.get("requests")),
            setups=_int(fields.get("setups")),
            error=fields.get("error", ""),
            degraded=fields.get("degraded", ""),
            slot=fields.get("slot", ""),
            recycles=_int(fields.get("recycles")),
            history=[(float(at), str(state)) for at, state in _json_list(fields.get("history"))],
            replace=fields.get("replace", ""),
            rss_mb=_float(fields.get("rss_mb")),
            cpu_percent=_float(fields["cpu_percent"]) if fields.get("cpu_percent") else None,
            beat_at=_float(fields.get("beat_at")),
            task=fields.get("task", ""),
            lease=fields.get("lease", ""),
        )


@dataclass(frozen=True)
class NodeRecord:
    """One worker node (a ``poolq worker`` main process), as it last published itself."""

    id: str
    pool: str = ""
    state: NodeState = ""
    host: str = ""
    pid: int = 0
    #: Its base size (as maintenance last scaled it), and the extra agents it may start.
    size: int = 0
    max_overflow: int = 0
    processes: int = 0
    worker_pool: str = ""
    started_at: float = 0.0

    @classmethod
    def parse(cls, node: str, fields: Mapping[str, str], size: int = 0, max_overflow: int = 0) -> NodeRecord:
        return cls(
            id=node,
            pool=fields.get("pool", ""),
            state=cast(NodeState, fields.get("state", "")),
            host=fields.get("host", ""),
            pid=_int(fields.get("pid")),
            size=_int(fields.get("size"), size),
            max_overflow=_int(fields.get("max_overflow"), max_overflow),
            processes=_int(fields.get("processes")),
            worker_pool=fields.get("worker_pool", ""),
            started_at=_float(fields.get("started_at")),
        )


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(float(value)) if value not in (None, "") else default
    except ValueError:
        return default


def _float(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


def _json_list(value: str | None) -> list[Any]:
    try:
        loaded = json.loads(value) if value else []
    except ValueError:
        return []
    return loaded if isinstance(loaded, list) else []
