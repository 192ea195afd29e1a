"""One agent of a worker process, and its bookkeeping."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from ..agent import Agent

#: Seconds before a failed setup is tried again (doubles up to the pool's breaker_reset).
SETUP_RETRY_MIN = 1.0
#: Lifecycle states kept per agent (shown by status).
HISTORY_KEPT = 10


@dataclass
class AgentSlot:
    """One agent and its bookkeeping."""

    agent_id: str
    suffix: str = ""
    name: str = ""
    agent: Agent | None = None
    state: str = "starting"
    #: Calls of this slot, all its agents together (the recycling limits count from here).
    requests: int = 0
    #: ``requests`` when the current agent was set up: the agent's own count is the difference.
    requests_before: int = 0
    setups: int = 0
    started_at: float = field(default_factory=time.time)
    last_used_at: float = 0.0
    health_checked_at: float = 0.0
    requests_limit: float = math.inf
    age_limit: float = math.inf
    setup_error: str = ""
    retry_at: float = 0.0
    retry_delay: float = SETUP_RETRY_MIN
    #: The agent's place in the pool, kept across its recycles (and its process's warm replacement).
    slot_id: str = ""
    #: Where its agent runs (the agent's ``self.device``; see :mod:`poolq.worker.placement`).
    device: str | None = None
    recycles: int = 0
    #: Why this agent is being replaced ('' when it is not).
    replacing: str = ""
    #: Why this slot is no longer recycled (past max_recycles; '' when it is).
    degraded: str = ""
    #: The agent's last lifecycle states, as (time, state).
    history: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=HISTORY_KEPT))
