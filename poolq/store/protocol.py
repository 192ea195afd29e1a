"""What crosses Redis between a poolq client and a poolq worker, besides the task.

Celery carries the task message (broker queue ``poolq.<pool>``, acks late).
Its headers say what poolq needs: the operation, where the reply goes, the
call's deadline for an agent to take it, its ``call_timeout``, and for a
cast the key that keeps its result. Around it poolq keeps small records in
its state Redis:

**The claim** (``poolq:claim:<task id>``, a hash: owner, attempts). Before an
agent runs a call, its worker claims the task atomically; a call still
unclaimed at its deadline (by the Redis server's clock) is claimed as
``expired`` instead, by the worker that finds it or by its caller. Whoever
claims first decides, so a call that raised
:class:`~poolq.errors.CheckoutTimeout` can never run later. The same record
makes redeliveries safe: a copy of a call whose first run is alive is held
back until that run ends; a copy whose runner died is taken over (whatever
its deadline: it was accepted); a copy that killed ``max_deliveries``
runners fails as a poison pill.

**Cancelling** (``Handle.revoke()``, a cancelled ``acall``) goes through the
same record: a call nobody claimed yet is claimed as ``cancelled`` (it never
runs, like an expired one); a call an agent holds gets a ``cancel`` field,
which the agent may poll and which replaces the call's reply when it
finishes. Celery's own revoke is not used: it is a list of ids in each
worker's memory, lost on restart and not shared with nodes that start later.

**The reply** (a list the caller names: ``poolq:reply:<task id>``, or an
event loop's mailbox): the worker pushes one JSON document and the caller
``BLPOP``\\ s it. A cast's reply also goes to ``poolq:result:<task id>``,
kept for ``result_expires`` seconds, where any process reads it by id.

The agent's registry record is updated inside the same round trips (claim:
busy; done: idle), so the registry costs the call path nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal, cast

from .. import errors
from . import keys
from .connection import Scripts
from .messages import encode_error

#: Celery message headers poolq adds to a call.
HEADER_OP = "poolq_op"
#: The Redis list the reply is pushed to.
HEADER_REPLY = "poolq_reply"
#: A cast's result key (none for a call).
HEADER_RESULT = "poolq_result"
#: The time (epoch seconds, on the state Redis's clock) by which an agent must take the call.
HEADER_DEADLINE = "poolq_deadline"
#: When the client sent the call (epoch seconds, its clock): how long it waited for an agent.
HEADER_SENT = "poolq_sent"
#: Seconds the agent may spend on the call.
HEADER_CALL_TIMEOUT = "poolq_call_timeout"
#: A lease request carries its lease id and its idle TTL in seconds.
HEADER_LEASE = "poolq_lease"
HEADER_LEASE_TTL = "poolq_lease_ttl"

#: Seconds a caller waits past ``call_timeout`` for the worker's own timeout reply.
CALL_GRACE = 2.0
#: Seconds past ``call_timeout`` after which a worker kills an agent that ignored its interruption.
HARD_GRACE = 1.0
#: Seconds an unread reply is kept (the caller may have given up).
REPLY_TTL = 300
#: Seconds a claim outlives its task; longer than any redelivery can take.
CLAIM_TTL = 2 * 3600

EXPIRED = "expired"
DONE = "done"
#: A claim's owner once its call was withdrawn before any agent took it (it never runs).
CANCELLED = "cancelled"
#: Claims that say the call is over, or never runs: a worker that finds one drops its message.
CLOSED = (EXPIRED, DONE, CANCELLED)
#: A claim's verdict when the worker found the call unclaimed past its deadline.
TIMED_OUT = "timed_out"


# KEYS: claim, agent.  ARGV: owner, claim ttl, now, task id, deadline ('' for none).
# Returns {"run", 1} when this owner got the claim, {"timed_out", 0} when the
# call was still unclaimed past its deadline (by the server's clock: one clock
# for every host) and is now expired, else {owner, attempts}.
_CLAIM = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  if ARGV[5] ~= '' then
    local t = redis.call('TIME')
    if tonumber(t[1]) + tonumber(t[2]) / 1000000 > tonumber(ARGV[5]) then
      redis.call('HSET', KEYS[1], 'owner', 'expired')
      redis.call('EXPIRE', KEYS[1], ARGV[2])
      return {'timed_out', 0}
    end
  end
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'attempts', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HSET', KEYS[2], 'state', 'busy', 'last_used_at', ARGV[3], 'task', ARGV[4])
  end
  return {'run', 1}
end
return {owner, tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')}
"""

# KEYS: claim, agent.  ARGV: new owner, dead owner, claim ttl, now, task id.
# Returns the new attempt count, or -1 when somebody else changed the claim.
_TAKEOVER = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return -1 end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'state', 'busy', 'last_used_at', ARGV[4], 'task', ARGV[5])
end
return attempts
"""

# KEYS: reply, claim, agent, pool stats, result ('' for a call).  ARGV: reply,
# reply ttl, claim ttl, now, agent requests, 1 if the operation ran, the
# agent's state from now on, result ttl.  The agent record is only touched
# while its heartbeat lives, so a late finish cannot resurrect a record
# without a TTL.  A call cancelled while it ran (the claim's 'cancel' field,
# see _CANCEL) gets that CallCancelled reply instead of its own, whatever its
# outcome: returns 2 then, else 1.  An empty reply sends nothing: a lease
# answers through its own messages (poolq.worker.lease).
_FINISH = """
local reply = ARGV[1]
local cancelled = redis.call('HGET', KEYS[2], 'cancel')
if cancelled and reply ~= '' then reply = cancelled end
if reply ~= '' then
  redis.call('RPUSH', KEYS[1], reply)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  if KEYS[5] ~= '' then
    redis.call('SET', KEYS[5], reply, 'EX', ARGV[8])
  end
end
redis.call('HSET', KEYS[2], 'owner', 'done')
redis.call('EXPIRE', KEYS[2], ARGV[3])
if KEYS[3] ~= '' and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'state', ARGV[7], 'last_used_at', ARGV[4], 'requests', ARGV[5], 'task', '')
end
if ARGV[6] == '1' then
  redis.call('HINCRBY', KEYS[4], 'requests', 1)
end
if cancelled and reply == cancelled then return 2 end
return 1
"""

# The reply that closes a call nobody runs (KEYS[2] reply list, KEYS[3] result
# key; ARGV[3], ARGV[4] their ttls): shared by _GIVE_UP and _CANCEL.
_DELIVER = """
local function deliver(reply)
  if KEYS[2] ~= '' then
    redis.call('RPUSH', KEYS[2], reply)
    redis.call('EXPIRE', KEYS[2], ARGV[3])
  end
  if KEYS[3] ~= '' then redis.call('SET', KEYS[3], reply, 'EX', ARGV[4]) end
end
"""

# KEYS: claim, reply ('' for none), result ('' for none).  ARGV: claim ttl,
# the CheckoutTimeout reply, reply ttl, result ttl.  The caller gives up: when
# no agent holds the call it is marked expired (it will never run) and the
# reply is written for whoever reads it; returns {''} then, else {owner, attempts}.
_GIVE_UP = _DELIVER + """
if redis.call('HSETNX', KEYS[1], 'owner', 'expired') == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  deliver(ARGV[2])
  return {''}
end
local owner = redis.call('HGET', KEYS[1], 'owner')
return {owner, tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0'), redis.call('EXISTS', ARGV[5] .. owner)}
"""  # fmt: skip


# KEYS: claim, reply ('' for none), result ('' for none).  ARGV: claim ttl,
# the CallCancelled reply of a withdrawn call, reply ttl, result ttl, the
# CallCancelled reply of an interrupted one.  One script, like _GIVE_UP, so
# that whoever comes first (a claim, a give-up, a finish, this) decides:
# - nobody holds the call: it is marked cancelled (no agent ever runs it) and
#   the reply written: 'withdrawn';
# - an agent holds it: the claim's 'cancel' field is set, which the agent
#   can poll (Agent.cancelled) and which _FINISH puts in place of the call's
#   own reply: 'interrupting';
# - it is over (done, expired, a cast's result kept): 'finished', nothing changes.
_CANCEL = _DELIVER + """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner == 'cancelled' then return 'withdrawn' end
if owner == 'done' or owner == 'expired' then return 'finished' end
-- A claim outlives neither: a cast whose claim is gone but whose result is kept is over.
if KEYS[3] ~= '' and redis.call('EXISTS', KEYS[3]) == 1 then return 'finished' end
if not owner then
  redis.call('HSET', KEYS[1], 'owner', 'cancelled')
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  deliver(ARGV[2])
  return 'withdrawn'
end
redis.call('HSETNX', KEYS[1], 'cancel', ARGV[5])
return 'interrupting'
"""  # fmt: skip

#: What :func:`cancel` says: the call never runs; it runs and is asked to stop
#: (it ends in CallCancelled whatever it returns); it was over already.
Revocation = Literal["withdrawn", "interrupting", "finished"]


@dataclass(frozen=True)
class Claim:
    """The outcome of a worker's claim on a task."""

    run: bool
    owner: str = ""
    attempts: int = 1


@dataclass(frozen=True)
class ClaimView:
    """A claim as its caller sees it when it stops waiting for a reply.

    ``owner`` is empty when the caller's own give-up won (the call never runs),
    ``expired``, ``done``, or the id of the agent that holds the call.
    """

    owner: str
    attempts: int = 0
    alive: bool = False

    @property
    def given_up(self) -> bool:
        return self.owner in ("", EXPIRED)


def claim(
    scripts: Scripts, task_id: str, owner: str, agent_id: str, now: float, deadline: float | None = None
) -> Claim:
    """Claim ``task_id`` for ``owner``; say who holds it otherwise (``expired`` past an unclaimed deadline)."""
    verdict, attempts = scripts.run(
        _CLAIM,
        keys=[keys.claim(task_id), keys.agent(agent_id)],
        args=[owner, CLAIM_TTL, now, task_id, "" if deadline is None else repr(deadline)],
    )
    # Our own name: a retried claim whose first answer was lost on the way.
    if verdict in ("run", owner):
        return Claim(run=True, owner=owner, attempts=int(attempts))
    return Claim(run=False, owner=str(verdict), attempts=int(attempts))


def take_over(scripts: Scripts, task_id: str, owner: str, dead_owner: str, agent_id: str, now: float) -> int:
    """Take the claim of a dead runner; the new attempt count, or -1 if it moved."""
    return int(
        scripts.run(
            _TAKEOVER,
            keys=[keys.claim(task_id), keys.agent(agent_id)],
            args=[owner, dead_owner, CLAIM_TTL, now, task_id],
        )
    )


def give_up_command(task_id: str, reply_to: str = "", result: str = "", result_ttl: int = 0) -> list[Any]:
    """The EVAL arguments of a caller's give-up (see :func:`give_up`), for any Redis client."""
    expired = errors.CheckoutTimeout(f"no agent took call {task_id} before its deadline; it will not run")
    names = [keys.claim(task_id), reply_to, result]
    args = [CLAIM_TTL, encode_error(task_id, expired, ""), REPLY_TTL, result_ttl or REPLY_TTL, keys.AGENT_PREFIX]
    return [_GIVE_UP, len(names), *names, *args]


def claim_view(answer: list[Any]) -> ClaimView:
    """The give-up script's answer, read (the sync and the asyncio client alike)."""
    owner, attempts, alive = [*answer, 0, 0][:3]
    return ClaimView(owner=str(owner or ""), attempts=int(attempts or 0), alive=bool(int(alive or 0)))


def give_up(
    scripts: Scripts, task_id: str, reply_to: str = "", result: str = "", result_ttl: int = 0
) -> tuple[str, int]:
    """The caller stops waiting for an agent: ``("", 0)`` when it won (the call never runs), else (owner, attempts).

    When it wins, a :class:`~poolq.errors.CheckoutTimeout` reply goes to
    ``reply_to`` and ``result`` (a cast's result key), if given.
    """
    view = inspect(scripts, task_id, reply_to, result, result_ttl)
    return view.owner, view.attempts


def inspect(scripts: Scripts, task_id: str, reply_to: str = "", result: str = "", result_ttl: int = 0) -> ClaimView:
    """:func:`give_up`, and whether the agent that holds the call (if one does) is alive, in one round trip."""
    script, count, *rest = give_up_command(task_id, reply_to, result, result_ttl)
    return claim_view(scripts.run(script, keys=rest[:count], args=rest[count:]))


def cancel_command(task_id: str, reply_to: str = "", result: str = "", result_ttl: int = 0) -> list[Any]:
    """The EVAL arguments of a cancel (see :func:`cancel`), for any Redis client."""
    withdrawn = errors.CallCancelled(f"call {task_id} was cancelled before an agent took it; it did not run")
    stopped = errors.CallCancelled(f"call {task_id} was cancelled while it ran; its result is dropped")
    names = [keys.claim(task_id), reply_to, result]
    ttl = result_ttl or REPLY_TTL
    # A withdrawn cast may sit in the queue as long as its result is kept:
    # its claim must say "cancelled" until a worker finds it.
    args = [
        max(CLAIM_TTL, ttl),
        encode_error(task_id, withdrawn, ""),
        REPLY_TTL,
        ttl,
        encode_error(task_id, stopped, ""),
    ]
    return [_CANCEL, len(names), *names, *args]


def cancel(scripts: Scripts, task_id: str, reply_to: str = "", result: str = "", result_ttl: int = 0) -> Revocation:
    """Cancel a call: withdraw it if no agent took it yet, else ask its agent to stop.

    Returns ``"withdrawn"`` (it will never run; a CallCancelled reply went to
    ``reply_to`` and ``result``, if given), ``"interrupting"`` (an agent runs
    it: the call ends in CallCancelled, early if the agent polls
    :meth:`~poolq.Agent.cancelled`) or ``"finished"`` (it was over: nothing changes).
    """
    script, count, *rest = cancel_command(task_id, reply_to, result, result_ttl)
    return revocation(scripts.run(script, keys=rest[:count], args=rest[count:]))


def revocation(answer: Any) -> Revocation:
    """The answer of the cancel script, checked."""
    said = answer.decode() if isinstance(answer, bytes) else str(answer)
    if said not in ("withdrawn", "interrupting", "finished"):
        raise errors.PoolqError(f"unexpected answer to a cancel: {said!r} (a poolq version mismatch?)")
    return cast(Revocation, said)


def cancel_requested(scripts: Scripts, task_id: str) -> bool:
    """Whether the running call ``task_id`` was cancelled (one round trip)."""
    return bool(scripts.command("HEXISTS", keys.claim(task_id), "cancel"))


def finish(
    scripts: Scripts,
    task_id: str,
    reply: str,
    reply_to: str,
    agent_id: str,
    stats_key: str,
    requests_done: int,
    ran: bool,
    now: float,
    agent_state: str = "idle",
    result: str = "",
    result_ttl: int = 0,
    retry_until: float | None = None,
) -> bool:
    """In one round trip: push the reply (and keep a cast's result), close the claim, set the agent's state.

    With ``retry_until`` (monotonic), a state Redis that is unreachable (a
    restart) is tried again until then, so a call that finished during the
    outage still reaches its caller.

    Returns True when the call had been cancelled while it ran: its caller got
    CallCancelled instead of ``reply``.
    """
    names = [reply_to or keys.reply(task_id), keys.claim(task_id), keys.agent(agent_id) if agent_id else "", stats_key]
    args = [reply, REPLY_TTL, CLAIM_TTL, now, requests_done, int(ran), agent_state, result_ttl or REPLY_TTL]
    answer = scripts.run_until(retry_until, _FINISH, keys=[*names, result], args=args)
    return int(answer) == 2


def deadline_after(seconds: float | None) -> float | None:
    """The epoch time ``seconds`` from now (a call's deadline header), or None."""
    if seconds is None or math.isinf(seconds):
        return None
    return time.time() + seconds
