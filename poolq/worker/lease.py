"""The agent side of a lease: one agent serves one client's calls until release.

A lease arrives as an ordinary call (so it waits its turn in the pool's
queue, and a checkout timeout is the same promise as for a call). Once an
agent claims it, the agent is marked ``leased`` and serves requests from the
lease's private request list, replying on its reply list, until the client
releases it or sends nothing for ``ttl`` seconds. Then ``reset()`` runs, or,
when the lease ended broken (``release(broken=True)``, a call timeout, an
unhealthy agent, an expired TTL), the agent is recycled: no dirty agent goes
back to the pool.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from .. import events
from ..errors import AgentUnavailable, CallTimeout, CheckoutTimeout, InvalidArguments, UnknownOperation
from ..store import keys, messages, protocol, ratelimit, registry
from . import limits
from .slot import AgentSlot

logger = logging.getLogger("poolq.worker")


def serve(runtime: Any, slot: AgentSlot, lease_id: str, ttl: float) -> tuple[str, bool]:
    """Serve the lease until it ends; how it ended, and whether the agent must be recycled."""
    state: redis.Redis = runtime.state
    requests, replies = keys.lease_requests(lease_id), keys.lease_replies(lease_id)
    try:
        agent = runtime.host.ensure_ready(slot)
    except AgentUnavailable as exc:
        _push(state, replies, ttl, messages.lease_ended("unavailable", str(exc)))
        return "unavailable", False
    _set_state(state, slot, "leased", lease_id)
    _push(state, replies, ttl, messages.lease_grant(slot.agent_id, slot.name))
    logger.info("agent %s leased (%s)", slot.name, lease_id)
    events.emit(events.LeaseStarted(runtime.pool.name, agent=slot.name, lease_id=lease_id))
    ended, broken, served = "expired", True, slot.requests
    try:
        while True:
            raw = runtime.scripts.pop(requests, time.monotonic() + ttl)
            if raw is None:
                # The client sent nothing for ttl seconds: it is gone, or its next call is told so.
                _push(state, replies, ttl, messages.lease_ended("expired"))
                break
            request = messages.LeaseRequest.decode(raw)
            if request.release:
                ended, broken = "released", request.broken
                break
            reply, outcome = _run(runtime, slot, agent, request, lease_id, ttl)
            _push(state, replies, ttl, messages.lease_reply(request.seq, reply))
            if outcome is not None:
                ended, broken = outcome, True
                _push(state, replies, ttl, messages.lease_ended(outcome))
                break
    finally:
        state.delete(requests)
        registry.count(state, runtime.pool.name, requests=slot.requests - served)
        ended_event = events.LeaseEnded(
            runtime.pool.name,
            agent=slot.name,
            lease_id=lease_id,
            ended=ended,
            broken=broken,
            calls=slot.requests - served,
        )
        events.emit(ended_event)
    return ended, broken


def _run(
    runtime: Any, slot: AgentSlot, agent: Any, request: messages.LeaseRequest, lease_id: str, ttl: float
) -> tuple[str, str | None]:
    """Run one request; its reply, and why the lease must end (or None)."""
    op, call_id, pool = request.op or "handle", f"{lease_id}/{request.seq}", runtime.pool.name
    started = time.monotonic()

    def failed(exc: BaseException, ran: bool = True) -> None:
        kind, duration = messages.error_kind(exc), time.monotonic() - started
        event = events.CallFailed(
            pool, op=op, agent=slot.name, task_id=call_id, duration_s=duration, kind=kind,
            error_type=type(exc).__name__, message=str(exc)[:500], ran=ran,
        )  # fmt: skip
        events.emit(event)

    try:
        operation = agent.bind(request.op, request.args, request.kwargs)
    except (UnknownOperation, InvalidArguments) as exc:
        failed(exc, ran=False)
        return messages.encode_error("", exc, ""), None
    rate = runtime.pool.rate
    if rate is not None:
        # Every call of a lease takes a slot too, right before it starts.
        wait = request.wait or runtime.pool.timeout
        if not ratelimit.wait(runtime.scripts, pool, rate, call_id, until=started + wait):
            late = CheckoutTimeout(
                f"lease call {request.seq} got no slot of the pool's rate_limit ({rate}) "
                f"within {wait:g}s; it did not run"
            )
            failed(late, ran=False)
            return messages.encode_error("", late, ""), None
    slot.requests += 1
    slot.last_used_at = time.time()
    queued = time.monotonic() - started
    events.emit(events.CallStarted(pool, op=op, agent=slot.name, task_id=call_id, queued_s=queued))
    timeout = CallTimeout(f"lease call {request.seq} ({op}) ran past its call_timeout")
    replies = keys.lease_replies(lease_id)

    def report_stuck() -> None:
        # From the watchdog, just before it ends this process.
        _push(runtime.state, replies, ttl, messages.lease_reply(request.seq, messages.encode_error("", timeout, "")))

    try:
        with limits.limit(
            request.call_timeout,
            limits.CallDeadline,
            report_stuck,
            f"lease call {request.seq} of {lease_id}",
            hard=runtime.hard_limits,
        ):
            result = operation()
    except limits.CallDeadline:
        failed(timeout)
        return messages.encode_error("", timeout, ""), "call_timeout"
    except Exception as exc:
        failed(exc)
        healthy = runtime.host.healthy(slot)
        return messages.encode_error("", exc, None), None if healthy else "unhealthy"
    try:
        reply = messages.encode_result("", result)
    except (TypeError, ValueError, RecursionError) as exc:
        error = TypeError(f"{op}() returned a value that is not plain JSON: {exc}")
        failed(error)
        return messages.encode_error("", error, ""), None
    succeeded = events.CallSucceeded(
        pool, op=op, agent=slot.name, task_id=call_id, duration_s=time.monotonic() - started
    )
    events.emit(succeeded)
    return reply, None


def end(runtime: Any, slot: AgentSlot, ended: str, broken: bool) -> None:
    """Make a leased agent fit for the next caller: reset it, or recycle it when the lease ended broken."""
    if broken:
        runtime.host.recycle(slot, f"lease: ended {ended}")
    else:
        try:
            if slot.agent is not None:
                slot.agent.reset()
        except Exception:
            logger.exception("reset of agent %s failed", slot.name)
            runtime.host.recycle(slot, "reset: reset() raised")
    if slot.agent is not None:
        _set_state(runtime.state, slot, "idle", "")
    logger.info("lease of agent %s ended: %s", slot.name, ended)


def refuse(runtime: Any, lease_id: str, ttl: float, ended: str) -> None:
    """Tell the lease's client it ended before this agent served it (its agent died before: ``ended``)."""
    _push(runtime.state, keys.lease_replies(lease_id), ttl, messages.lease_ended(ended))


def _push(state: redis.Redis, key: str, ttl: float, message: str) -> None:
    pipe = state.pipeline(transaction=False)
    pipe.rpush(key, message)
    pipe.expire(key, int(ttl) + protocol.REPLY_TTL)
    pipe.execute()


def _set_state(state: redis.Redis, slot: AgentSlot, value: str, lease_id: str) -> None:
    slot.state = value
    key = keys.agent(slot.agent_id)
    if state.exists(key):
        state.hset(key, mapping={"state": value, "lease": lease_id, "requests": slot.requests})
