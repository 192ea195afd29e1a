"""The agent host: the warm agents of one worker process.

A prefork or solo worker process hosts one agent; a ``threads`` worker hosts
one agent per thread and hands them out by the pool's strategy (``lifo``
reuses the most recently used agent, ``fifo`` rotates through all of them).

The host builds its agents when the process starts, before the process takes
work, publishes their state to the registry, keeps their heartbeat (with the
process's memory and CPU), checks their health, has them replaced when a
limit is reached (:mod:`poolq.worker.recycling`), and tears them down on
shutdown.

An agent that reached a limit still works, so it is replaced warm first: in a
prefork node, the process asks its node for a new process and serves on until
that one is ready (:mod:`poolq.worker.scaler`). Where the agents share the
node's process (``threads``, ``solo``) it recycles in place (teardown, then
setup, in the thread that runs its calls, so thread-bound agents stay valid),
one agent of the pool at a time. A broken agent (a call that timed out, an
unhealthy one) recycles in place at once, right after the call, before the
process takes more work.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from billiard.process import current_process

from .. import events
from ..agent import Agent, load_agent_class
from ..config import PoolConfig
from ..errors import AgentUnavailable
from ..scaling.policy import jittered
from ..store import keys, metrics, names, registry
from . import limits, placement, recycling
from .slot import SETUP_RETRY_MIN, AgentSlot
from .usage import CpuWindow, rss_mb

logger = logging.getLogger("poolq.worker")


class AgentHost:
    """The agents of this process for one pool.

    ``retire(slot, recycles, reason)`` asks the node to replace this whole
    process, warm first: a prefork child, whose node starts a new process
    and retires this one once the new agent is ready. ``slot`` is this
    process's slot and recycle count when it replaces another one.
    """

    def __init__(
        self,
        pool: PoolConfig,
        state: redis.Redis,
        node: str,
        slots: int = 1,
        retire: Callable[[str, int, str], None] | None = None,
        slot: tuple[str, int] | None = None,
    ) -> None:
        self.pool = pool
        self.state = state
        self.node = node
        self.retire = retire
        #: Whether a stuck setup may be ended with its process (not where other agents share it).
        self.hard_limits = pool.worker_pool != "threads"
        #: Where this process's agents run: its CUDA_VISIBLE_DEVICES is narrowed now, before any agent code.
        self.placement = placement.for_process(pool, slots)
        placement.apply(self.placement)
        self.agent_class = load_agent_class(pool)
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        suffixes = [""] if slots == 1 else [f".{i}" for i in range(slots)]
        self.slots = [
            AgentSlot(
                agent_id=f"{pool.name}@{self.hostname}:{self.pid}{s}",
                suffix=s,
                name=f"{pool.name}-{self.pid}{s}",
                slot_id=f"{node}/{self.pid}{s}",
                device=device,
            )
            for s, device in zip(suffixes, self.placement.devices, strict=True)
        ]
        if self.placement.visible is not None:
            logger.info("process %d: %s=%s", self.pid, placement.VISIBLE_DEVICES, self.placement.visible)
        if slot is not None:
            self.slots[0].slot_id, self.slots[0].recycles = slot
        self.cpu = CpuWindow(pool.cpu_window) if pool.max_cpu_percent is not None else None
        self._free: deque[AgentSlot] = deque()
        self._cond = threading.Condition()
        by_key = {keys.agent(slot.agent_id): slot for slot in self.slots}
        self._heartbeat = registry.Heartbeat(
            state,
            keys=by_key.keys,
            republish=lambda key: self._publish(by_key[key]),
            fields=self._beat_fields,
            after=self._check_idle_health,
        )

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Name every agent, start the heartbeat, then build the agents.

        While the pool's circuit breaker is open (setups keep failing, or hang
        until they are ended) a new process does not try again at once: its
        agents wait, failed, until the breaker lets calls try (half-open).
        """
        for slot in self.slots:
            # Published before the name is taken: the name pool reclaims the
            # names of agents without a live record.
            self._publish(slot)
            self._rename(slot)
        self._heartbeat.start()
        hold, error = self._breaker_hold()
        for slot in self.slots:
            if hold > 0:
                slot.state, slot.setup_error = "failed", f"not set up while the pool is degraded: {error}"
                slot.retry_at = time.monotonic() + hold
                self._publish(slot)
                logger.warning("agent %s: pool %s is degraded, setup held off %.0fs", slot.name, self.pool.name, hold)
            else:
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
        with contextlib.suppress(redis.RedisError):
            metrics.recorder.flush(self.state)  # the calls since the last heartbeat

    @contextmanager
    def checkout(self) -> Iterator[AgentSlot]:
        """Lend an agent slot for one call (see :meth:`ensure_ready` for its agent)."""
        with self._cond:
            while not self._free:
                self._cond.wait()
            slot = self._free.pop() if self.pool.handout == "lifo" else self._free.popleft()
        try:
            yield slot
        finally:
            with self._cond:
                self._free.append(slot)
                self._cond.notify()

    def ensure_ready(self, slot: AgentSlot) -> Agent:
        """The slot's agent, healthy: set up again if its last setup failed long enough
        ago, recycled first if it fails its health check (asked before every call).

        Raises:
            AgentUnavailable: setup failed and may not be retried yet, or failed again.
        """
        if slot.degraded and slot.agent is None:
            raise AgentUnavailable(f"agent slot {slot.slot_id} is degraded: {slot.degraded}")
        if slot.agent is None:
            if time.monotonic() >= slot.retry_at:
                self._setup(slot)
        elif slot.state == "unhealthy" or not self.healthy(slot):
            # Checked before every call: an unhealthy agent never serves one.
            self.recycle(slot, "health: failed its health check")
        if slot.agent is None:
            raise AgentUnavailable(f"agent {slot.name} is unavailable: setup failed: {slot.setup_error}")
        return slot.agent

    def healthy(self, slot: AgentSlot) -> bool:
        """Ask the slot's agent whether it can take more work (a raising check says no)."""
        slot.health_checked_at = time.monotonic()
        if slot.agent is None:
            return False
        try:
            return bool(slot.agent.healthy())
        except Exception:
            logger.exception("health check of agent %s raised", slot.name)
            return False

    def after_call(self, slot: AgentSlot) -> None:
        """Replace the agent if the call just made it reach a limit (requests, age, memory, CPU)."""
        if slot.agent is None:
            return
        reason = recycling.limit_reached(self.pool, slot, self.cpu)
        if reason:
            self.replace(slot, reason)

    def replace(self, slot: AgentSlot, reason: str) -> None:
        """Replace an agent that reached a limit (it still works) without taking warm capacity away.

        In a prefork node the process asks its node for a warm replacement and
        serves on until that one is ready (see :mod:`poolq.worker.scaler`).
        Elsewhere it recycles in place, one agent of the pool at a time: an
        agent whose turn has not come serves on and tries after its next call.
        """
        if slot.replacing or slot.degraded:
            return
        if self._past_max_recycles(slot, reason):
            return
        if self.retire is not None:
            slot.replacing = reason
            self._mark_for_replacement(slot, reason)
            self.retire(slot.slot_id, slot.recycles, reason)
            return
        with recycling.recycle_turn(self.state, self.pool.name, slot.agent_id) as ours:
            if ours:
                self.recycle(slot, reason)

    def recycle(self, slot: AgentSlot, reason: str) -> None:
        """Replace the slot's agent by a fresh one in place (teardown, then setup).

        Runs inside the current call, after its reply went out and outside
        the call's time limit: the setup is not part of the call.
        """
        if self._past_max_recycles(slot, reason):
            self._teardown(slot)  # broken, and no longer recycled: it serves no more
            self._publish(slot)
            return
        logger.info("recycling agent %s: %s", slot.name, reason)
        old_name = slot.name
        slot.state = "recycling"
        slot.recycles += 1
        self._publish(slot)
        self._teardown(slot)
        self._count(recycles=1)
        self._rename(slot)  # a new agent, a new name
        memory = self.pool.max_memory_mb
        if memory is not None:
            gc.collect()
            if rss_mb() > memory:
                # Teardown did not give the memory back: only a new process will.
                # It takes no more work: it is retired once this call is done.
                logger.warning("agent %s: %.0f MB after teardown; retiring its process", slot.name, rss_mb())
                left = f"max_memory: over {memory:g} MB after teardown"
                self._mark_for_replacement(slot, left)
                if self.retire is not None:
                    slot.replacing = left
                    self.retire(slot.slot_id, slot.recycles, slot.replacing)
        self._setup(slot)
        events.emit(
            events.AgentRecycled(
                self.pool.name, agent=old_name, trigger=recycling.trigger_of(reason), reason=reason, warm=False
            )
        )

    # -- internals ---------------------------------------------------------

    def _past_max_recycles(self, slot: AgentSlot, reason: str) -> bool:
        """Mark the slot degraded, instead of recycling it again, once it was recycled max_recycles times."""
        limit = self.pool.max_recycles
        if limit is None or slot.recycles < limit:
            return False
        slot.degraded = f"recycled {slot.recycles} times (max_recycles {limit}); last: {reason}"
        slot.history.append((round(time.time(), 1), "degraded"))
        logger.error("agent slot %s is degraded: %s", slot.slot_id, slot.degraded)
        self._publish(slot)
        return True

    def _beat_fields(self) -> dict[str, Any]:
        if self.cpu is not None:
            self.cpu.sample()
        fields: dict[str, Any] = {"rss_mb": round(rss_mb(), 1)}
        if self.cpu is not None and (used := self.cpu.average()) is not None:
            fields["cpu_percent"] = round(used, 1)
        return fields

    def _setup(self, slot: AgentSlot) -> None:
        slot.state = "starting"
        if self.placement.error:
            self._setup_failed(slot, f"NoDevice: {self.placement.error}")
            return
        agent = self.agent_class(self.pool.options, pool=self.pool.name, name=slot.name, device=slot.device)
        started = time.monotonic()
        limit = self.pool.setup_timeout

        def report_stuck() -> None:
            # From the watchdog, just before it ends this process.
            self._setup_failed(slot, f"SetupTimeout: setup() ran past setup_timeout ({limit:g}s) and did not stop")

        try:
            with limits.limit(limit, limits.SetupDeadline, report_stuck, f"setup of {slot.name}", self.hard_limits):
                agent.setup()
        except limits.SetupDeadline:
            self._setup_failed(slot, f"SetupTimeout: setup() ran past setup_timeout ({limit:g}s)")
            with contextlib.suppress(Exception):
                agent.teardown()  # whatever it built before it was stopped
        except Exception as exc:
            logger.error("setup of agent %s failed:\n%s", slot.name, traceback.format_exc())
            self._setup_failed(slot, f"{type(exc).__name__}: {exc}")
        else:
            slot.agent = agent
            slot.state = "idle"
            slot.setups += 1
            slot.started_at = time.time()
            slot.requests_before = slot.requests
            slot.health_checked_at = time.monotonic()
            slot.setup_error = ""
            slot.retry_delay = SETUP_RETRY_MIN
            incarnation = f"{slot.agent_id}#{slot.setups}"
            if self.pool.max_requests is not None:
                slot.requests_limit = slot.requests + math.ceil(
                    jittered(self.pool.max_requests, self.pool.recycle_jitter, incarnation)
                )
            if self.pool.max_age is not None:
                slot.age_limit = jittered(self.pool.max_age, self.pool.recycle_jitter, incarnation)
            self._count(spawned=1)
            self._record_setup(slot, ok=True)
            logger.info("agent %s ready in %.2fs", slot.name, time.monotonic() - started)
        self._publish(slot)

    def _setup_failed(self, slot: AgentSlot, error: str) -> None:
        slot.agent = None
        slot.state = "failed"
        slot.setup_error = error
        slot.retry_at = time.monotonic() + slot.retry_delay
        slot.retry_delay = min(slot.retry_delay * 2, self.pool.breaker_reset)
        logger.error("agent %s is unavailable: %s", slot.name, error)
        self._record_setup(slot, ok=False)
        self._publish(slot)

    def _breaker_hold(self) -> tuple[float, str]:
        """Seconds until the pool's open breaker lets setups try again (0 when closed), and its error."""
        try:
            stats = {str(k): str(v) for k, v in self.state.hgetall(keys.stats(self.pool.name)).items()}
        except redis.RedisError:
            return 0.0, ""
        now = time.time()
        if not registry.breaker_open(stats, now):
            return 0.0, ""
        return float(stats.get("breaker_until") or now) - now, stats.get("breaker_error", "")

    def _rename(self, slot: AgentSlot) -> None:
        """Give the slot's next agent a name from the name pool (and the old one back).

        A slot's first agent prefers a name the node's agents had before it
        restarted; a recycled agent gets a new name.
        """
        try:
            old = slot.name if slot.setups else ""
            prefer = [] if old else names.remembered(self.state, self.node)
            slot.name = names.checkout(self.state, slot.agent_id, self.hostname, self.pid, slot.suffix, prefer=prefer)
            if old:
                # Given back only now, so the new agent never gets its old name.
                names.release(self.state, old)
        except redis.RedisError:
            logger.warning("no name from the name pool for %s; keeping %s", slot.agent_id, slot.name)
        if len(self.slots) == 1:
            # Celery's log lines name the process: let them name the agent.
            current_process().name = slot.name
        self._publish(slot)

    def _record_setup(self, slot: AgentSlot, ok: bool) -> None:
        pool = self.pool
        try:
            if ok:
                if registry.setup_succeeded(self.state, pool.name):
                    events.emit(events.PoolRecovered(pool.name))
                return
            breaker = registry.setup_failed(
                self.state,
                pool.name,
                slot.setup_error,
                time.time(),
                pool.breaker_window,
                pool.breaker_failures,
                pool.breaker_reset,
                member=f"{slot.agent_id}#{time.time()}",
            )
        except redis.RedisError:
            logger.warning("could not record the setup of %s", slot.name, exc_info=True)
            return
        if breaker == registry.BREAKER_OPENED:
            logger.error("pool %s is degraded: setup keeps failing (%s)", pool.name, slot.setup_error)
            events.emit(events.PoolDegraded(pool.name, error=slot.setup_error))

    def _teardown(self, slot: AgentSlot) -> None:
        agent, slot.agent = slot.agent, None
        if agent is None:
            return
        try:
            agent.teardown()
        except Exception:
            logger.exception("teardown of agent %s failed", slot.name)
        self._count(terminated=1)

    def _check_idle_health(self) -> None:
        """In the heartbeat thread: check agents that sat idle past health_interval, and idle agents' limits.

        A checked agent is out of the free list while it is checked, and goes
        back to its place (the lifo/fifo order is the strategy's, not the heartbeat's).
        """
        for slot in self.slots:
            health_due = time.monotonic() - slot.health_checked_at >= self.pool.health_interval
            if slot.agent is None or not (health_due or self.retire is not None):
                continue
            with self._cond:
                if slot not in self._free:
                    continue  # busy: it is checked before and after its next call
                place = self._free.index(slot)
                self._free.remove(slot)
            try:
                if health_due and not self.healthy(slot):
                    logger.warning("agent %s failed its health check while idle", slot.name)
                    slot.state = "unhealthy"
                    self._mark_for_replacement(slot, "health: failed its health check while idle")
                elif self.retire is not None and (reason := recycling.limit_reached(self.pool, slot, self.cpu)):
                    self.replace(slot, reason)  # a warm replacement, asked from here: no call needed
            finally:
                with self._cond:
                    self._free.insert(min(place, len(self._free)), slot)
                    self._cond.notify()

    def _mark_for_replacement(self, slot: AgentSlot, reason: str) -> None:
        self._publish(slot)
        try:
            self.state.hset(keys.agent(slot.agent_id), "replace", reason)
        except redis.RedisError:
            logger.warning("could not mark %s for replacement", slot.name, exc_info=True)

    def _count(self, **increments: int) -> None:
        try:
            registry.count(self.state, self.pool.name, **increments)
        except redis.RedisError:
            logger.warning("could not update the counters of pool %s", self.pool.name, exc_info=True)

    def _publish(self, slot: AgentSlot) -> None:
        event = "degraded" if slot.degraded and slot.agent is None else slot.state
        if not slot.history or slot.history[-1][1] != event:
            slot.history.append((round(time.time(), 1), event))
        fields = {
            "pool": self.pool.name,
            "name": slot.name,
            "state": "degraded" if slot.degraded and slot.agent is None else slot.state,
            "node": self.node,
            "host": self.hostname,
            "pid": self.pid,
            "started_at": slot.started_at,
            "last_used_at": slot.last_used_at,
            "requests": slot.requests - slot.requests_before,  # this agent's, not its slot's
            "setups": slot.setups,
            "error": slot.setup_error,
            "degraded": slot.degraded,
            "slot": slot.slot_id,
            "recycles": slot.recycles,
            "history": json.dumps(list(slot.history)),
        }
        try:
            registry.publish(self.state, self.pool.name, slot.agent_id, fields)
        except redis.RedisError:
            logger.warning("could not publish %s to the registry", slot.agent_id, exc_info=True)
