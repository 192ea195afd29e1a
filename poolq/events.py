"""What happens in a pool, as events: hooks to subscribe to, log lines, and the source of the metrics.

Subclass :class:`Observer` and override the hooks you need (each does nothing
by default), then name it in the configuration, so that every worker,
maintainer and node loads it::

    # myapp/audit.py
    class Audit(poolq.Observer):
        def call_failed(self, event: poolq.events.CallFailed) -> None:
            alerts.send(f"{event.pool}.{event.op} failed on {event.agent}: {event.error_type}")

    # config/pools.toml
    [poolq]
    observers = ["myapp.audit:Audit"]       # or POOLQ_OBSERVERS=myapp.audit:Audit

or call :func:`subscribe` in a process of your own. Events happen where the
work happens: calls, leases, recycles and setups in the worker process that
hosts the agent; node scaling in the node's main process; pool scaling in the
maintainer. A hook runs in the thread of the event, right then: keep it quick.
A hook that raises is logged and ignored.

Two observers are always there: :class:`LogObserver` (one line per event on
the ``poolq.events`` logger: calls at DEBUG, the rest at INFO) and the
metrics recorder (:mod:`poolq.store.metrics`), which ``/metrics`` reads.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

logger = logging.getLogger("poolq.events")


@dataclass(frozen=True)
class Event:
    """Something that happened in a pool."""

    pool: str
    #: When (epoch seconds).
    at: float = field(default_factory=time.time, kw_only=True)
    #: The Observer method that hears it.
    hook: ClassVar[str] = ""
    #: The level of its log line.
    level: ClassVar[int] = logging.INFO


@dataclass(frozen=True)
class CallStarted(Event):
    """An agent took a call. ``queued_s``: how long it waited for one (client and worker clocks)."""

    op: str
    agent: str
    task_id: str
    queued_s: float
    hook: ClassVar[str] = "call_started"
    level: ClassVar[int] = logging.DEBUG


@dataclass(frozen=True)
class CallSucceeded(Event):
    """A call's operation returned."""

    op: str
    agent: str
    task_id: str
    duration_s: float
    hook: ClassVar[str] = "call_succeeded"
    level: ClassVar[int] = logging.DEBUG


@dataclass(frozen=True)
class CallFailed(Event):
    """A call ended in an error: ``kind`` as in its reply (``agent``, ``call_timeout`` ...).

    ``ran``: whether its operation started (else it failed before: no agent in
    time, an unknown operation, a degraded pool ...); ``duration_s`` counts from
    the start of the operation when it ran, else from the call's delivery.
    """

    op: str
    agent: str
    task_id: str
    duration_s: float
    kind: str
    error_type: str
    message: str
    ran: bool
    hook: ClassVar[str] = "call_failed"
    level: ClassVar[int] = logging.DEBUG


@dataclass(frozen=True)
class LeaseStarted(Event):
    agent: str
    lease_id: str
    hook: ClassVar[str] = "lease_started"


@dataclass(frozen=True)
class LeaseEnded(Event):
    """A lease ended: ``ended`` says how (released, expired, call_timeout, ...); a broken one recycles its agent."""

    agent: str
    lease_id: str
    ended: str
    broken: bool
    calls: int
    hook: ClassVar[str] = "lease_ended"


@dataclass(frozen=True)
class AgentRecycled(Event):
    """An agent was replaced by a fresh one. ``trigger``: what set it off; ``reason``: in words."""

    agent: str
    trigger: str
    reason: str
    #: Whether its replacement was warm before it left (a new process first).
    warm: bool
    hook: ClassVar[str] = "agent_recycled"


@dataclass(frozen=True)
class PoolScaled(Event):
    """A node (``node``) or the pool's maintenance (``node`` empty) changed the number of agents."""

    node: str
    direction: str
    before: int
    after: int
    reason: str
    hook: ClassVar[str] = "pool_scaled"


@dataclass(frozen=True)
class PoolDegraded(Event):
    """Setups keep failing: the pool's circuit breaker opened."""

    error: str
    hook: ClassVar[str] = "pool_degraded"
    level: ClassVar[int] = logging.WARNING


@dataclass(frozen=True)
class PoolRecovered(Event):
    """A setup worked again: the pool's circuit breaker closed."""

    hook: ClassVar[str] = "pool_recovered"


class Observer:
    """Hears a pool's events: override the hooks you need; each does nothing by default."""

    def handle(self, event: Event) -> None:
        """Hand ``event`` to its hook (override to hear every event in one place)."""
        getattr(self, event.hook)(event)

    def call_started(self, event: CallStarted) -> None:
        """An agent took a call."""

    def call_succeeded(self, event: CallSucceeded) -> None:
        """A call's operation returned."""

    def call_failed(self, event: CallFailed) -> None:
        """A call ended in an error."""

    def lease_started(self, event: LeaseStarted) -> None:
        """An agent was leased."""

    def lease_ended(self, event: LeaseEnded) -> None:
        """A lease ended."""

    def agent_recycled(self, event: AgentRecycled) -> None:
        """An agent was replaced by a fresh one."""

    def pool_scaled(self, event: PoolScaled) -> None:
        """A node or the pool changed size."""

    def pool_degraded(self, event: PoolDegraded) -> None:
        """The pool's circuit breaker opened."""

    def pool_recovered(self, event: PoolRecovered) -> None:
        """The pool's circuit breaker closed."""


class LogObserver(Observer):
    """One structured line per event: ``event=call_failed pool=echo op=upper agent=brave-otter ...`` (no ``at``)."""

    def handle(self, event: Event) -> None:
        if logger.isEnabledFor(event.level):
            shown = {key: value for key, value in asdict(event).items() if key not in ("pool", "at")}
            fields = " ".join(f"{key}={_show(value)}" for key, value in shown.items())
            logger.log(event.level, "event=%s pool=%s %s", event.hook, event.pool, fields)


_observers: list[Observer] = [LogObserver()]


def subscribe(observer: Observer) -> None:
    """Have ``observer`` hear every event of this process from now on."""
    if observer not in _observers:
        _observers.append(observer)


def unsubscribe(observer: Observer) -> None:
    if observer in _observers:
        _observers.remove(observer)


def emit(event: Event) -> None:
    """Deliver ``event`` to every observer of this process."""
    for observer in tuple(_observers):
        try:
            observer.handle(event)
        except Exception:
            logger.exception("observer %r failed on %s", observer, event.hook)


def load(paths: Iterable[str]) -> list[Observer]:
    """Subscribe the observers named by import path (``module:Class``); the ones subscribed.

    Raises:
        ConfigError: a path does not name an Observer class.
    """
    from .errors import ConfigError

    loaded = []
    for path in paths:
        module_name, _, name = path.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"observer {path!r}: cannot import it: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Observer)):
            raise ConfigError(f"observer {path!r} is not a poolq.Observer subclass")
        observer = cls()
        subscribe(observer)
        loaded.append(observer)
    return loaded


def _show(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return repr(text) if (" " in text or not text) else text
