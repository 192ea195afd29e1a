"""Every public poolq error, under one root.

Remote failures keep the remote type name and traceback as data (strings),
never as a pickled exception object. An error a worker sends back to a
caller travels as its ``kind`` (see :mod:`poolq.store.protocol`).
"""

from __future__ import annotations

from typing import Any, ClassVar


class PoolqError(Exception):
    """Base class of every error poolq raises."""

    #: The name of this error in a reply (errors a worker never sends have none).
    kind: ClassVar[str] = ""

    @classmethod
    def by_kind(cls) -> dict[str, type[PoolqError]]:
        """Every error class with a kind, by kind."""
        found: dict[str, type[PoolqError]] = {}
        pending: list[type[PoolqError]] = [cls]
        while pending:
            current = pending.pop()
            if current.kind:
                found[current.kind] = current
            pending.extend(current.__subclasses__())
        return found


class ConfigError(PoolqError):
    """The pool configuration (file or environment) is invalid."""


class BrokerNotConfigured(PoolqError):
    """No broker URL is set and no `poolq up` runs in this project."""


class EmbeddedBrokerError(PoolqError):
    """The embedded broker (``poolq up``, the test fixtures) could not be started."""


class AlreadyRunning(PoolqError):
    """Another ``poolq up`` runs in this project directory."""


class BrokerUnavailable(PoolqError):
    """The broker or the state Redis cannot be reached."""


class UnknownPool(PoolqError):
    """The named pool is not declared in the configuration."""


class InvalidPayload(PoolqError):
    """Arguments are not plain JSON, nest too deep, or exceed the pool's size limit."""

    kind = "invalid_payload"


class InvalidOption(PoolqError, ValueError):
    """A client option (``timeout``, ``call_timeout``, ``ttl``, ``op``, ``block``) has a bad value."""


class BlockingInEventLoop(PoolqError, RuntimeError):
    """A blocking client method was called inside a running event loop: use its async form."""


class UnknownOperation(PoolqError):
    """The agent has no operation of that name."""

    kind = "unknown_operation"


class InvalidArguments(PoolqError):
    """The arguments do not fit the operation's signature."""

    kind = "invalid_arguments"


class PoolExhausted(PoolqError):
    """No agent is free and overflow is spent (or the queue is at ``max_waiting``); nothing was sent."""


class RateLimited(PoolExhausted):
    """The pool's ``rate_limit`` has no free slot now and the caller asked not to wait (``block=False``)."""

    kind = "rate_limited"


class PoolClosed(PoolqError):
    """The pool was stopped on purpose (``poolq stop``); calls fail at once until one of its nodes starts again."""


class LeaseLost(PoolqError):
    """The lease ended before the call: its TTL passed, a call timed out, or its agent died."""

    kind = "lease_lost"


class PoolqTimeout(PoolqError, TimeoutError):
    """Base class of poolq's timeouts (also a builtin ``TimeoutError``)."""


class CheckoutTimeout(PoolqTimeout):
    """No agent took the call within ``timeout``; the call will never run."""

    kind = "checkout_timeout"


class CallTimeout(PoolqTimeout):
    """The agent started the call but did not finish within ``call_timeout``."""

    kind = "call_timeout"


class CallCancelled(PoolqError):
    """The call was cancelled (``Handle.revoke()``, a cancelled ``acall``): withdrawn unrun, or stopped mid-run."""

    kind = "cancelled"


class ResultTimeout(PoolqTimeout):
    """A cast's result was not ready within the wait given to ``Handle.result``."""


class AgentError(PoolqError):
    """The agent raised while handling the call.

    Attributes:
        remote_type: dotted name of the exception class in the worker.
        message: ``str()`` of the remote exception.
        remote_traceback: the formatted remote traceback.
    """

    kind = "agent"

    def __init__(self, remote_type: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.remote_type, self.message, self.remote_traceback))


class AgentCrashed(AgentError):
    """The call killed its worker process more times than ``max_deliveries`` allows."""

    kind = "crashed"


class AgentUnavailable(PoolqError):
    """The agent could not be set up, so the call was not run."""

    kind = "unavailable"


class PoolDegraded(AgentUnavailable):
    """The pool's agents keep failing to set up (circuit breaker open); the call was not sent."""

    kind = "degraded"
