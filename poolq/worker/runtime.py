"""What a worker process does with one call, from claim to reply.

The Celery task of every pool is a thin shell around :func:`run_call`: the
task message brings the arguments, and this module claims the call, lends an
agent, runs the operation and finishes the call in one more round trip (reply,
claim closed, agent idle).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.utils.time import maybe_iso8601

from .. import protocol, registry
from ..config import Config, PoolConfig
from ..errors import (
    AgentCrashed,
    AgentUnavailable,
    CallTimeout,
    CheckoutTimeout,
    InvalidArguments,
    PoolDegraded,
    UnknownOperation,
)
from . import alarm, lease
from .host import AgentHost, AgentSlot

logger = logging.getLogger("poolq.worker")

# Set on an exception once its error reply went out.
_REPORTED = "__poolq_reported__"


@dataclass
class Runtime:
    """The poolq side of one worker process: its pool, agents and state client."""

    config: Config
    pool: PoolConfig
    host: AgentHost
    state: redis.Redis
    scripts: protocol.Scripts

    @classmethod
    def create(cls, config: Config, pool: PoolConfig, node: str, slots: int) -> Runtime:
        state = protocol.connect(config.state_url)
        host = AgentHost(pool, state, node=node, slots=slots)
        return cls(config=config, pool=pool, host=host, state=state, scripts=protocol.Scripts(state))


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


@dataclass(frozen=True)
class Call:
    """One call as the worker sees it."""

    task_id: str
    op: str | None
    reply_to: str | None
    lease: str | None = None
    lease_ttl: float = 0.0
    #: The call_timeout poolq enforces itself (solo workers; see :mod:`.alarm`).
    deadline: float | None = None


def run_call(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run one call of ``task``'s pool on an agent of this process."""
    runtime = _runtime
    if runtime is None:
        raise RuntimeError("poolq: this worker process hosts no agent (is it started by `poolq worker POOL`?)")
    request = task.request
    call = Call(
        task_id=request.id,
        op=getattr(request, protocol.HEADER_OP, None),
        reply_to=getattr(request, protocol.HEADER_REPLY, None) or None,
        lease=getattr(request, protocol.HEADER_LEASE, None) or None,
        lease_ttl=float(getattr(request, protocol.HEADER_LEASE_TTL, 0) or 0),
        deadline=_soft_limit(request) if runtime.pool.worker_pool == "solo" else None,
    )
    with runtime.host.checkout() as slot:
        try:
            attempt = _admit(runtime, slot, call, _deadline(request.expires))
            if not attempt:
                raise Ignore()
            if call.lease:
                # A lease redelivered after its agent died is not served again:
                # its client has lost that agent's state and hears LeaseLost.
                if attempt > 1:
                    _finish(runtime, slot, call, "", ran=False)
                    return {"lease": call.lease, "ended": "agent died"}
                ended, broken = lease.serve(runtime, slot, call.lease, call.lease_ttl)
                _finish(runtime, slot, call, "", ran=False, agent_state="recycling" if broken else "idle")
                lease.end(runtime, slot, ended, broken)
                runtime.host.after_call(slot)
                return {"lease": call.lease, "ended": ended}
            return _invoke(runtime, slot, call, list(args), kwargs)
        except Ignore:
            raise
        except Exception as exc:
            # Whatever went wrong, the caller hears it now rather than at its timeout.
            if not getattr(exc, _REPORTED, False):
                with contextlib.suppress(redis.RedisError):
                    _fail(runtime, slot, call, "agent", exc, with_traceback=True)
            raise


def _soft_limit(request: Any) -> float | None:
    _, soft = request.timelimit or (None, None)
    return float(soft) if soft else None


def _deadline(expires: Any) -> float | None:
    """The call's expiry as a timestamp (Celery hands it over as ISO text or datetime)."""
    if expires is None:
        return None
    return float(maybe_iso8601(expires).timestamp() if isinstance(expires, str) else expires.timestamp())


def _admit(runtime: Runtime, slot: AgentSlot, call: Call, deadline: float | None) -> int:
    """Claim the call for this agent: the delivery number, or 0 when it must not run here."""
    if deadline is not None and deadline < time.time():
        # Celery checks expiry on receipt, but a prefork job can wait in the
        # parent's buffer past it; the claim makes the verdict final.
        if protocol.expire(runtime.scripts, call.task_id):
            expired = CheckoutTimeout(f"call {call.task_id} waited past its timeout before an agent was free")
            _fail(runtime, slot, call, "checkout_timeout", expired)
            raise expired
        return 0
    now = time.time()
    claim = protocol.claim(runtime.scripts, call.task_id, slot.agent_id, slot.agent_id, now)
    if claim.run:
        return 1
    if claim.owner in (protocol.EXPIRED, protocol.DONE) or _owner_alive(runtime, claim.owner):
        logger.info("skipping call %s: already %s", call.task_id, claim.owner)
        return 0
    attempts = protocol.take_over(runtime.scripts, call.task_id, slot.agent_id, claim.owner, slot.agent_id, now)
    if attempts < 0:
        return 0
    logger.warning("call %s: its runner %s died; delivery %d", call.task_id, claim.owner, attempts)
    if attempts > runtime.pool.max_deliveries:
        exc = AgentCrashed(
            "WorkerLost",
            f"call {call.task_id} killed its worker process {attempts - 1} times; not delivered again "
            f"(max_deliveries = {runtime.pool.max_deliveries})",
        )
        _fail(runtime, slot, call, "crashed", exc)
        raise exc
    return attempts


def _invoke(runtime: Runtime, slot: AgentSlot, call: Call, args: list[Any], kwargs: dict[str, Any]) -> Any:
    try:
        agent = runtime.host.ensure_ready(slot)
        operation = agent.bind(call.op, args, kwargs)
    except AgentUnavailable as exc:
        stats = {str(k): str(v) for k, v in runtime.state.hgetall(registry.stats_key(runtime.pool.name)).items()}
        if registry.breaker_open(stats, time.time()):
            degraded = PoolDegraded(f"pool {runtime.pool.name!r} is degraded: {stats.get('breaker_error', exc)}")
            _fail(runtime, slot, call, "degraded", degraded)
            raise degraded from None
        _fail(runtime, slot, call, "unavailable", exc)
        raise
    except UnknownOperation as exc:
        _fail(runtime, slot, call, "unknown_operation", exc)
        raise
    except InvalidArguments as exc:
        _fail(runtime, slot, call, "invalid_arguments", exc)
        raise

    slot.requests += 1
    slot.last_used_at = time.time()
    try:
        with alarm.deadline(call.deadline):
            result = operation()
    except (SoftTimeLimitExceeded, alarm.CallDeadline):
        timeout = CallTimeout(f"call {call.task_id} ({call.op or 'handle'}) ran past its call_timeout")
        _fail(runtime, slot, call, "call_timeout", timeout, ran=True)
        # The agent was interrupted mid-operation: never hand it out again as is.
        runtime.host.recycle(slot, "call timed out")
        raise timeout from None
    except Exception as exc:
        _fail(runtime, slot, call, "agent", exc, with_traceback=True, ran=True)
        # An agent that raised stays in service unless its health says otherwise.
        if not runtime.host.healthy(slot):
            runtime.host.recycle(slot, f"unhealthy after {type(exc).__name__}")
        else:
            runtime.host.after_call(slot)
        raise
    try:
        reply = protocol.encode_result(call.task_id, result)
    except (TypeError, ValueError) as exc:
        error = TypeError(f"{call.op or 'handle'}() returned a value that is not plain JSON: {exc}")
        _fail(runtime, slot, call, "agent", error, ran=True)
        runtime.host.after_call(slot)
        raise error from None
    _finish(runtime, slot, call, reply, ran=True)
    # Busy agents recycle right after the call that reached a limit, before the
    # process takes more work (the reply is already on its way).
    runtime.host.after_call(slot)
    return result


def _fail(
    runtime: Runtime,
    slot: AgentSlot,
    call: Call,
    kind: str,
    exc: BaseException,
    with_traceback: bool = False,
    ran: bool = False,
) -> None:
    _finish(runtime, slot, call, protocol.encode_error(call.task_id, kind, exc, None if with_traceback else ""), ran)
    with contextlib.suppress(AttributeError):
        setattr(exc, _REPORTED, True)


def _finish(runtime: Runtime, slot: AgentSlot, call: Call, reply: str, ran: bool, agent_state: str = "idle") -> None:
    protocol.finish(
        runtime.scripts,
        call.task_id,
        reply if call.reply_to else None,
        call.reply_to or "",
        slot.agent_id,
        registry.stats_key(runtime.pool.name),
        slot.requests,
        ran,
        time.time(),
        agent_state if slot.agent is not None else slot.state,
    )


def _owner_alive(runtime: Runtime, owner: str) -> bool:
    """Whether the agent that holds a claim still lives.

    Its registry heartbeat must be current, and when it runs on this host its
    pid must exist: right after a kill -9 the heartbeat still looks fresh.
    """
    if not registry.is_alive(runtime.state, owner):
        return False
    host, _, pid = owner.partition("@")[2].rpartition(":")
    if host != runtime.host.hostname:
        return True
    try:
        os.kill(int(pid.split(".")[0]), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True
