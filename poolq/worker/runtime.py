"""What a worker process does with one call, from claim to reply.

The Celery task of every pool is a thin shell around :func:`run_call`: the
task message brings the arguments, and this module claims the call, lends an
agent, runs the operation within its limits and finishes the call in one
more round trip (reply, claim closed, agent idle).

The caller's result travels through poolq's own keys (the reply list, and a
cast's result key), never through Celery. What the task returns is only what
Celery shows: its ``succeeded`` log line and the ``task-succeeded`` event
(Flower's *result*). It is :func:`summary`, which names the pool, the
operation and the agent, and carries none of the call's data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, Reject

from .. import events
from ..config import Config, PoolConfig
from ..errors import (
    AgentCrashed,
    AgentUnavailable,
    CallCancelled,
    CallTimeout,
    CheckoutTimeout,
    InvalidArguments,
    PoolDegraded,
    UnknownOperation,
)
from ..store import connection, keys, messages, protocol, ratelimit, registry
from . import cancelling, lease, limits
from .host import AgentHost
from .slot import AgentSlot

logger = logging.getLogger("poolq.worker")

#: Seconds a worker keeps trying to write a call's claim or reply while the
#: state Redis is unreachable (a restart), so a call that ran still reaches its caller.
STATE_RETRY = 30.0

# Set on an exception once its error reply went out.
_REPORTED = "__poolq_reported__"


@dataclass
class Runtime:
    """The poolq side of one worker process: its pool, agents and state client."""

    config: Config
    pool: PoolConfig
    host: AgentHost
    state: redis.Redis
    scripts: connection.Scripts

    @property
    def hard_limits(self) -> bool:
        """Whether a stuck agent may be ended with its process (not where other agents share it)."""
        return self.pool.worker_pool != "threads"

    @classmethod
    def create(
        cls,
        config: Config,
        pool: PoolConfig,
        node: str,
        slots: int,
        retire: Callable[[str, int, str], None] | None = None,
        slot: tuple[str, int] | None = None,
    ) -> Runtime:
        state = connection.connect(config.state_url)
        host = AgentHost(pool, state, node=node, slots=slots, retire=retire, slot=slot)
        return cls(config=config, pool=pool, host=host, state=state, scripts=connection.Scripts(state))


_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    """Make ``runtime`` this process's runtime and build its agents."""
    global _runtime
    _runtime = runtime
    runtime.host.start()


def uninstall() -> None:
    """Tear this process's agents down (on shutdown)."""
    global _runtime
    runtime, _runtime = _runtime, None
    if runtime is not None and runtime.host.pid == os.getpid():
        runtime.host.stop()


def current() -> Runtime | None:
    return _runtime


@dataclass
class Call:
    """One call as the worker sees it (from the task message's headers), and when it got here."""

    task_id: str
    op: str | None
    reply_to: str
    #: A cast's result key ('' for a call).
    result: str = ""
    #: Epoch seconds by which an agent must take the call; None: no deadline.
    deadline: float | None = None
    call_timeout: float | None = None
    lease: str | None = None
    lease_ttl: float = 0.0
    #: When the client sent it (epoch seconds, the client's clock); None from an older client.
    sent: float | None = None
    #: When this process took the message, and when its operation started (monotonic).
    received: float = field(default_factory=time.monotonic)
    started: float | None = None
    #: Which delivery of the call this is (above 1: its first runner died).
    delivery: int = 1

    @property
    def operation(self) -> str:
        return self.op or "handle"

    @classmethod
    def from_request(cls, request: Any) -> Call:
        def header(name: str) -> Any:
            return getattr(request, name, None)

        deadline, call_timeout = header(protocol.HEADER_DEADLINE), header(protocol.HEADER_CALL_TIMEOUT)
        return cls(
            task_id=request.id,
            op=header(protocol.HEADER_OP) or None,
            reply_to=header(protocol.HEADER_REPLY) or keys.reply(request.id),
            result=header(protocol.HEADER_RESULT) or "",
            # Read leniently: a bad header from another sender must not stop the reply.
            deadline=_number(deadline) if deadline else None,
            call_timeout=_number(call_timeout) if call_timeout else None,
            lease=header(protocol.HEADER_LEASE) or None,
            lease_ttl=_number(header(protocol.HEADER_LEASE_TTL)) or 0.0,
            sent=_number(header(protocol.HEADER_SENT)),
        )


def run_call(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run one call of ``task``'s pool on an agent of this process; its :func:`summary` for Celery."""
    runtime = _runtime
    if runtime is None:
        raise RuntimeError("poolq: this worker process hosts no agent (is it started by `poolq worker POOL`?)")
    call = Call.from_request(task.request)
    with runtime.host.checkout() as slot:
        try:
            attempt = call.delivery = admit(runtime, slot, call)
            if call.lease:
                # A lease redelivered after its agent died is not served again:
                # its client has lost that agent's state and hears LeaseLost.
                if attempt > 1:
                    lease.refuse(runtime, call.lease, call.lease_ttl, "agent died")
                    finish(runtime, slot, call, "", ran=False)
                    return summary(runtime.pool, call, slot.name, ended="agent died")
                ended, broken = lease.serve(runtime, slot, call.lease, call.lease_ttl)
                served_by = slot.name  # before a recycle renames the slot
                finish(runtime, slot, call, "", ran=False, agent_state="recycling" if broken else "idle")
                lease.end(runtime, slot, ended, broken)
                runtime.host.after_call(slot)
                return summary(runtime.pool, call, served_by, ended=ended)
            return summary(runtime.pool, call, _invoke(runtime, slot, call, list(args), kwargs))
        except (Ignore, Reject):
            raise
        except Exception as exc:
            # Whatever went wrong, the caller hears it now rather than at its timeout.
            if not getattr(exc, _REPORTED, False):
                with contextlib.suppress(redis.RedisError):
                    fail(runtime, slot, call, exc, with_traceback=True)
            raise


def summary(pool: PoolConfig, call: Call, agent: str, **more: str) -> dict[str, Any]:
    """What the Celery task returns: which pool, operation and agent served the call (a lease: its id too).

    Celery puts it, as a repr of at most ``resultrepr_maxsize`` characters,
    in its log line and in the ``task-succeeded`` event, which Flower shows
    as the task's result. The call's result is not in it: the caller has it
    already, and logs and dashboards need not.
    """
    shown: dict[str, Any] = {"pool": pool.name, "op": "lease" if call.lease else call.operation}
    if call.lease:
        shown["lease"] = call.lease
    shown["agent"] = agent
    shown.update(more)
    return shown


def admit(runtime: Runtime, slot: AgentSlot, call: Call) -> int:
    """Claim the call for this agent: the delivery number.

    Raises:
        Ignore: the call must not run here (done, given up or withdrawn by its caller).
        Reject: its first run is alive (the node holds this copy back and retries).
        CheckoutTimeout: still unclaimed past its deadline: it never runs.
        AgentCrashed: it killed its runner ``max_deliveries`` times.
    """
    now = time.time()
    claim = connection.retrying(
        time.monotonic() + STATE_RETRY,
        lambda: protocol.claim(runtime.scripts, call.task_id, slot.agent_id, slot.agent_id, now, call.deadline),
    )
    if claim.run:
        return 1
    if claim.owner == protocol.TIMED_OUT:
        # Celery's own expiry would drop the message unseen, even a call an agent
        # had started and died on; the claim makes the verdict, atomically.
        expired = CheckoutTimeout(f"call {call.task_id} waited past its timeout before an agent was free")
        fail(runtime, slot, call, expired)
        raise expired
    if claim.owner in protocol.CLOSED:
        logger.info("skipping call %s: already %s", call.task_id, claim.owner)
        if claim.owner == protocol.CANCELLED:
            # Withdrawn while queued: not run, not counted as a request; its caller has its reply.
            emit_failed(runtime, slot, call, CallCancelled.kind, "CallCancelled", "withdrawn before an agent took it")
        raise Ignore()
    if _owner_alive(runtime, claim.owner):
        logger.info("call %s: its first run (%s) is alive; holding this copy back", call.task_id, claim.owner)
        raise Reject(requeue=True)
    attempts = protocol.take_over(runtime.scripts, call.task_id, slot.agent_id, claim.owner, slot.agent_id, now)
    if attempts < 0:
        raise Reject(requeue=True)  # somebody else took it over meanwhile: look again later
    logger.warning("call %s: its runner %s died; delivery %d", call.task_id, claim.owner, attempts)
    if attempts > runtime.pool.max_deliveries:
        exc = AgentCrashed(
            "WorkerLost",
            f"call {call.task_id} killed its worker process {attempts - 1} times; not delivered again "
            f"(max_deliveries = {runtime.pool.max_deliveries})",
        )
        fail(runtime, slot, call, exc)
        raise exc
    return attempts


def _invoke(runtime: Runtime, slot: AgentSlot, call: Call, args: list[Any], kwargs: dict[str, Any]) -> str:
    """Run the operation and send its reply (its error: raised again, for Celery); the name of the agent that ran it."""
    try:
        agent = runtime.host.ensure_ready(slot)
        operation = agent.bind(call.op, args, kwargs)
    except AgentUnavailable as exc:
        stats = {str(k): str(v) for k, v in runtime.state.hgetall(keys.stats(runtime.pool.name)).items()}
        if registry.breaker_open(stats, time.time()):
            degraded = PoolDegraded(f"pool {runtime.pool.name!r} is degraded: {stats.get('breaker_error', exc)}")
            fail(runtime, slot, call, degraded)
            raise degraded from None
        fail(runtime, slot, call, exc)
        raise
    except (UnknownOperation, InvalidArguments) as exc:
        fail(runtime, slot, call, exc)
        raise

    if not take_rate_slot(runtime, call):
        late = CheckoutTimeout(
            f"call {call.task_id} waited past its timeout for a slot of the pool's rate_limit "
            f"({runtime.pool.rate}); it will not run"
        )
        fail(runtime, slot, call, late)
        raise late
    served_by = slot.name  # before a recycle after the call renames the slot
    slot.requests += 1
    slot.last_used_at = time.time()
    call.started = time.monotonic()
    queued = max(0.0, time.time() - call.sent) if call.sent is not None else 0.0
    events.emit(
        events.CallStarted(runtime.pool.name, op=call.operation, agent=slot.name, task_id=call.task_id, queued_s=queued)
    )
    timeout = CallTimeout(f"call {call.task_id} ({call.operation}) ran past its call_timeout")

    def report_stuck() -> None:
        # From the watchdog, just before it ends this process.
        fail(runtime, slot, call, timeout, ran=True, agent_state="stopped")

    try:
        with (
            limits.limit(
                call.call_timeout, limits.CallDeadline, report_stuck, f"call {call.task_id}", hard=runtime.hard_limits
            ),
            cancelling.watching(agent, runtime.scripts, call.task_id),
        ):
            result = operation()
    except limits.CallDeadline:
        fail(runtime, slot, call, timeout, ran=True, agent_state="recycling")
        # The agent was interrupted mid-operation: never hand it out again as is.
        runtime.host.recycle(slot, "call_timeout: interrupted mid-operation")
        raise timeout from None
    except Exception as exc:
        fail(runtime, slot, call, exc, with_traceback=True, ran=True)
        after_raise(runtime, slot, exc)
        raise
    error = answer(runtime, slot, call, result)
    # Busy agents recycle right after the call that reached a limit, before the
    # process takes more work (the reply is already on its way).
    runtime.host.after_call(slot)
    if error is not None:
        raise error
    return served_by


def answer(runtime: Runtime, slot: AgentSlot, call: Call, result: Any) -> TypeError | None:
    """Send the caller what its operation returned, and tell the observers.

    Returns the error sent instead when the result is not plain JSON. A call
    cancelled while it ran has its CallCancelled sent instead (by the finish).
    """
    try:
        reply = messages.encode_result(call.task_id, result)
    except (TypeError, ValueError, RecursionError) as exc:
        error = TypeError(f"{call.operation}() returned a value that is not plain JSON: {exc}")
        fail(runtime, slot, call, error, ran=True)
        return error
    if finish(runtime, slot, call, reply, ran=True):
        emit_failed(runtime, slot, call, CallCancelled.kind, "CallCancelled", "cancelled while it ran; it returned")
    else:
        events.emit(
            events.CallSucceeded(
                runtime.pool.name, op=call.operation, agent=slot.name, task_id=call.task_id, duration_s=_since(call)
            )
        )
    return None


def after_raise(runtime: Runtime, slot: AgentSlot, exc: Exception) -> None:
    """An agent whose operation raised stays in service unless its health says otherwise."""
    if not runtime.host.healthy(slot):
        runtime.host.recycle(slot, f"health: unhealthy after {type(exc).__name__}")
    else:
        runtime.host.after_call(slot)


def take_rate_slot(runtime: Runtime, call: Call) -> bool:
    """Take a slot of the pool's rate limit for the call, waiting for one until its deadline: whether it got one.

    Taken here, right before the operation starts, so the limit counts
    starts: a call refused for its arguments, or whose agent is replaced
    first, takes no slot. The call is already claimed, so waiting cannot run
    it twice; past its deadline it ends as ``CheckoutTimeout`` and never runs.
    A redelivered call was accepted before its runner died: it waits as long
    as it takes.
    """
    rate = runtime.pool.rate
    if rate is None:
        return True
    deadline = call.deadline if call.delivery == 1 else None
    member = f"{call.task_id}:{call.delivery}"
    return ratelimit.wait(runtime.scripts, runtime.pool.name, rate, member, deadline=deadline, retry=STATE_RETRY)


def fail(
    runtime: Runtime,
    slot: AgentSlot,
    call: Call,
    exc: BaseException,
    with_traceback: bool = False,
    ran: bool = False,
    agent_state: str = "idle",
) -> None:
    error = messages.encode_error(call.task_id, exc, None if with_traceback else "")
    cancelled = finish(runtime, slot, call, error, ran, agent_state)
    with contextlib.suppress(AttributeError):
        setattr(exc, _REPORTED, True)
    if cancelled:
        # Its caller got CallCancelled instead of this error.
        message = f"cancelled while it ran; it ended in {type(exc).__name__}: {exc}"
        emit_failed(runtime, slot, call, CallCancelled.kind, "CallCancelled", message)
    else:
        emit_failed(runtime, slot, call, messages.error_kind(exc), type(exc).__name__, str(exc))


def emit_failed(runtime: Runtime, slot: AgentSlot, call: Call, kind: str, error_type: str, message: str) -> None:
    events.emit(
        events.CallFailed(
            runtime.pool.name,
            op=call.operation,
            agent=slot.name,
            task_id=call.task_id,
            duration_s=_since(call),
            kind=kind,
            error_type=error_type,
            message=message[:500],
            ran=call.started is not None,
        )
    )


def _since(call: Call) -> float:
    """Seconds the call's operation has run (since its delivery, if it never started)."""
    return time.monotonic() - (call.started if call.started is not None else call.received)


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def finish(runtime: Runtime, slot: AgentSlot, call: Call, reply: str, ran: bool, agent_state: str = "idle") -> bool:
    """Send the call's reply (see :func:`~poolq.store.protocol.finish`): whether a cancel replaced it."""
    return protocol.finish(
        runtime.scripts,
        call.task_id,
        reply,
        call.reply_to,
        slot.agent_id,
        keys.stats(runtime.pool.name),
        slot.requests,
        ran,
        time.time(),
        agent_state if slot.agent is not None else slot.state,
        result=call.result,
        result_ttl=runtime.config.project.result_expires,
        retry_until=time.monotonic() + STATE_RETRY,
    )


def _owner_alive(runtime: Runtime, owner: str) -> bool:
    """Whether the agent that holds a claim still lives.

    Its registry heartbeat must be current, and when it runs on this host its
    pid must exist: right after a kill -9 the heartbeat still looks fresh.
    """
    return owner_alive(runtime.state, runtime.host.hostname, owner)


def owner_alive(state: redis.Redis, hostname: str, owner: str) -> bool:
    """Whether agent ``owner`` lives, as seen from a process on ``hostname``."""
    if not registry.is_alive(state, owner):
        return False
    host, _, pid = owner.partition("@")[2].rpartition(":")
    if host != hostname:
        return True
    try:
        os.kill(int(pid.split(".")[0]), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True
