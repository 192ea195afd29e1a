"""The agent host: the warm agents of one worker process.

A prefork or solo worker process hosts one agent; a ``threads`` worker hosts
one agent per thread and hands them out by the pool's strategy (``lifo``
reuses the most recently used agent, ``fifo`` rotates through all of them).

The host builds its agents when the process starts, before the process takes
work, publishes their state to the registry, keeps their heartbeat, and tears
them down on recycle and on shutdown.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis
from billiard.process import current_process

from .. import names, registry
from ..agent import Agent
from ..config import PoolConfig
from ..errors import AgentUnavailable, ConfigError
from ..protocol import agent_key

logger = logging.getLogger("poolq.worker")

#: Seconds before a failed setup is tried again (doubles up to the maximum).
SETUP_RETRY_MIN = 1.0
SETUP_RETRY_MAX = 60.0


def load_agent_class(pool: PoolConfig) -> type[Agent]:
    """Import the pool's agent class from its ``module:Class`` path.

    Raises:
        ConfigError: the module or class cannot be imported, or is no Agent.
    """
    for module_name in pool.requires:
        if importlib.util.find_spec(module_name) is None:
            raise ConfigError(f"pool {pool.name!r} requires the module {module_name!r}, which is not installed")
    module_name, _, class_name = pool.agent.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"pool {pool.name!r}: cannot import agent module {module_name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise ConfigError(f"pool {pool.name!r}: {pool.agent} is not a poolq.Agent subclass")
    return cls


@dataclass
class AgentSlot:
    """One agent and its bookkeeping."""

    agent_id: str
    suffix: str = ""
    name: str = ""
    agent: Agent | None = None
    state: str = "starting"
    requests: int = 0
    setups: int = 0
    started_at: float = field(default_factory=time.time)
    last_used_at: float = 0.0
    setup_error: str = ""
    retry_at: float = 0.0
    retry_delay: float = SETUP_RETRY_MIN


class AgentHost:
    """The agents of this process for one pool."""

    def __init__(self, pool: PoolConfig, state: redis.Redis, node: str, slots: int = 1) -> None:
        self.pool = pool
        self.state = state
        self.node = node
        self.agent_class = load_agent_class(pool)
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        suffixes = [""] if slots == 1 else [f".{i}" for i in range(slots)]
        self.slots = [
            AgentSlot(
                agent_id=f"{pool.name}@{self.hostname}:{self.pid}{s}", suffix=s, name=f"{pool.name}-{self.pid}{s}"
            )
            for s in suffixes
        ]
        self._free: deque[AgentSlot] = deque()
        self._cond = threading.Condition()
        by_key = {agent_key(slot.agent_id): slot for slot in self.slots}
        self._heartbeat = registry.Heartbeat(state, keys=by_key.keys, republish=lambda key: self._publish(by_key[key]))

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Name every agent, start the heartbeat, then build the agents."""
        for slot in self.slots:
            # Published before the name is taken: the name pool reclaims the
            # names of agents without a live record.
            self._publish(slot)
            try:
                slot.name = names.checkout(self.state, slot.agent_id, self.hostname, self.pid, slot.suffix)
            except redis.RedisError:
                logger.warning("no name from the name pool for %s; using %s", slot.agent_id, slot.name)
            self._publish(slot)
        if len(self.slots) == 1:
            # Celery's log lines name the process: let them name the agent.
            current_process().name = self.slots[0].name
        self._heartbeat.start()
        for slot in self.slots:
            self._setup(slot)
            with self._cond:
                self._free.append(slot)
                self._cond.notify()

    def stop(self, wait: float = 60.0) -> None:
        """Wait (up to ``wait`` s) for lent agents, then tear all down and leave the registry."""
        deadline = time.monotonic() + wait
        with self._cond:
            while len(self._free) < len(self.slots) and time.monotonic() < deadline:
                self._cond.wait(0.1)
        self._heartbeat.stop()
        for slot in self.slots:
            self._teardown(slot)
            slot.state = "stopped"
            try:
                registry.remove(self.state, self.pool.name, slot.agent_id)
                names.checkin(self.state, slot.name, self.hostname, self.pid, slot.suffix)
            except redis.RedisError:
                logger.warning("could not remove %s from the registry", slot.agent_id)
            logger.info("agent %s (%s) stopped", slot.name, slot.agent_id)

    @contextmanager
    def checkout(self) -> Iterator[AgentSlot]:
        """Lend an agent slot for one call (see :meth:`ensure_ready` for its agent)."""
        with self._cond:
            while not self._free:
                self._cond.wait()
            slot = self._free.pop() if self.pool.strategy == "lifo" else self._free.popleft()
        try:
            yield slot
        finally:
            with self._cond:
                self._free.append(slot)
                self._cond.notify()

    def recycle(self, slot: AgentSlot, reason: str) -> None:
        """Replace the slot's agent by a fresh one (teardown, then setup)."""
        logger.info("recycling agent %s: %s", slot.name, reason)
        slot.state = "recycling"
        self._publish(slot)
        self._teardown(slot)
        self._count(recycles=1)
        self._setup(slot)

    # -- internals ---------------------------------------------------------

    def _setup(self, slot: AgentSlot) -> None:
        slot.state = "starting"
        agent = self.agent_class(self.pool.options, pool=self.pool.name, name=slot.name)
        started = time.monotonic()
        try:
            agent.setup()
        except Exception as exc:
            slot.agent = None
            slot.state = "failed"
            slot.setup_error = f"{type(exc).__name__}: {exc}"
            slot.retry_at = time.monotonic() + slot.retry_delay
            slot.retry_delay = min(slot.retry_delay * 2, SETUP_RETRY_MAX)
            logger.error("setup of agent %s failed:\n%s", slot.agent_id, traceback.format_exc())
        else:
            slot.agent = agent
            slot.state = "idle"
            slot.setups += 1
            slot.started_at = time.time()
            slot.setup_error = ""
            slot.retry_delay = SETUP_RETRY_MIN
            self._count(spawned=1)
            logger.info("agent %s ready in %.2fs", slot.name, time.monotonic() - started)
        self._publish(slot)

    def healthy(self, slot: AgentSlot) -> bool:
        """Ask the slot's agent whether it can take more work (a raising check says no)."""
        if slot.agent is None:
            return False
        try:
            return bool(slot.agent.healthy())
        except Exception:
            logger.exception("health check of agent %s raised", slot.agent_id)
            return False

    def ensure_ready(self, slot: AgentSlot) -> Agent:
        """The slot's agent, set up again if its last setup failed long enough ago.

        Raises:
            AgentUnavailable: setup failed and may not be retried yet, or failed again.
        """
        if slot.agent is not None:
            return slot.agent
        if time.monotonic() < slot.retry_at:
            raise AgentUnavailable(f"agent {slot.agent_id} is unavailable: setup failed: {slot.setup_error}")
        self._setup(slot)
        if slot.agent is None:
            raise AgentUnavailable(f"agent {slot.agent_id} is unavailable: setup failed: {slot.setup_error}")
        return slot.agent

    def _teardown(self, slot: AgentSlot) -> None:
        agent, slot.agent = slot.agent, None
        if agent is None:
            return
        try:
            agent.teardown()
        except Exception:
            logger.exception("teardown of agent %s failed", slot.name)
        self._count(terminated=1)

    def _count(self, **increments: int) -> None:
        try:
            registry.count(self.state, self.pool.name, **increments)
        except redis.RedisError:
            logger.warning("could not update the counters of pool %s", self.pool.name, exc_info=True)

    def _publish(self, slot: AgentSlot) -> None:
        fields = {
            "pool": self.pool.name,
            "name": slot.name,
            "state": slot.state,
            "node": self.node,
            "host": self.hostname,
            "pid": self.pid,
            "started_at": slot.started_at,
            "last_used_at": slot.last_used_at,
            "requests": slot.requests,
            "setups": slot.setups,
            "error": slot.setup_error,
        }
        try:
            registry.publish(self.state, self.pool.name, slot.agent_id, fields)
        except redis.RedisError:
            logger.warning("could not publish %s to the registry", slot.agent_id, exc_info=True)
