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

**The reply** (a list the caller names: ``poolq:reply:<task id>``, or an
event loop's mailbox): the worker pushes one JSON document and the caller
``BLPOP``\\ s it. A cast's reply also goes to ``poolq:result:<task id>``,
kept for ``result_expires`` seconds, where any process reads it by id.

The agent's registry record is updated inside the same round trips (claim:
busy; done: idle), so the registry costs the call path nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import redis

from .. import errors
from . import keys

#: Celery message headers poolq adds to a call.
HEADER_OP = "poolq_op"
#: The Redis list the reply is pushed to.
HEADER_REPLY = "poolq_reply"
#: A cast's result key (none for a call).
HEADER_RESULT = "poolq_result"
#: The time (epoch seconds, on the state Redis's clock) by which an agent must take the call.
HEADER_DEADLINE = "poolq_deadline"
#: Seconds the agent may spend on the call.
HEADER_CALL_TIMEOUT = "poolq_call_timeout"
#: A lease request carries its lease id and its idle TTL in seconds.
HEADER_LEASE = "poolq_lease"
HEADER_LEASE_TTL = "poolq_lease_ttl"

#: Seconds a state Redis socket may stay silent before the client gives up on it.
SOCKET_TIMEOUT = 10.0
#: Longest single BLPOP, kept below SOCKET_TIMEOUT.
BLOCK_SLICE = 8.0
#: Seconds a caller waits past ``call_timeout`` for the worker's own timeout reply.
CALL_GRACE = 2.0
#: Seconds past ``call_timeout`` after which a worker kills an agent that ignored its interruption.
HARD_GRACE = 1.0
#: Seconds an unread reply is kept (the caller may have given up).
REPLY_TTL = 300
#: Seconds a claim outlives its task; longer than any redelivery can take.
CLAIM_TTL = 2 * 3600
#: Deepest nesting of lists and objects accepted in arguments (deeper ones could
#: exhaust the interpreter's stack where the message is decoded or handed on).
MAX_NESTING = 100
#: Longest pause between two tries while the state Redis is unreachable.
RECONNECT_BACKOFF_MAX = 1.0

EXPIRED = "expired"
DONE = "done"
#: A claim's verdict when the worker found the call unclaimed past its deadline.
TIMED_OUT = "timed_out"

#: The errors a reply can carry, by their kind.
_ERROR_KINDS = errors.PoolqError.by_kind()


#: Pooled connections of one state client (the call path's own are apart, see Scripts).
MAX_CONNECTIONS = 100


def connect(url: str) -> redis.Redis:
    """A client for the state Redis; it decodes replies to ``str``."""
    # Blocking: a burst of threads (a web server's) waits its turn for a
    # connection instead of failing with "Too many connections" past 100.
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=SOCKET_TIMEOUT,
        decode_responses=True,
        health_check_interval=30,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        socket_keepalive=True,
    )
    return redis.Redis(connection_pool=pool)


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
# without a TTL.
_FINISH = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if KEYS[5] ~= '' then
  redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[8])
end
redis.call('HSET', KEYS[2], 'owner', 'done')
redis.call('EXPIRE', KEYS[2], ARGV[3])
if KEYS[3] ~= '' and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'state', ARGV[7], 'last_used_at', ARGV[4], 'requests', ARGV[5], 'task', '')
end
if ARGV[6] == '1' then
  redis.call('HINCRBY', KEYS[4], 'requests', 1)
end
return 1
"""

# KEYS: claim, reply ('' for none), result ('' for none).  ARGV: claim ttl,
# the CheckoutTimeout reply, reply ttl, result ttl.  The caller gives up: when
# no agent holds the call it is marked expired (it will never run) and the
# reply is written for whoever reads it; returns {''} then, else {owner, attempts}.
_GIVE_UP = """
if redis.call('HSETNX', KEYS[1], 'owner', 'expired') == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  if KEYS[2] ~= '' then
    redis.call('RPUSH', KEYS[2], ARGV[2])
    redis.call('EXPIRE', KEYS[2], ARGV[3])
  end
  if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[4]) end
  return {''}
end
return {redis.call('HGET', KEYS[1], 'owner'), tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')}
"""


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


class Scripts:
    """The Lua scripts above, and BLPOP: the commands on the call path.

    They are sent and read directly on connections of their own: redis-py's
    generic command path (pool checkout, retry wrapper, health check) costs
    about as much as the network round trip on localhost, and a call makes
    three of these. Connections are shared through a free list, so a web
    server's short-lived request threads reuse them instead of connecting
    per request. A lost connection is reopened and the command sent once more.
    """

    #: Idle connections kept for reuse; more are closed when given back.
    KEEP_IDLE = 64

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._pid = os.getpid()

    def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run one of this module's Lua scripts (loading it into the server if needed)."""
        sha = _sha(script)
        try:
            return self.command("EVALSHA", sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.command("SCRIPT", "LOAD", script)
            return self.command("EVALSHA", sha, len(keys), *keys, *args)

    def run_until(self, deadline: float, script: str, keys: list[str], args: list[Any]) -> Any:
        """:meth:`run`, tried again while the server is unreachable, until ``deadline`` (monotonic).

        Raises:
            redis.ConnectionError: still unreachable at the deadline.
        """
        delay = 0.05
        while True:
            try:
                return self.run(script, keys, args)
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, RECONNECT_BACKOFF_MAX)

    def pop(self, key: str, deadline: float) -> str | None:
        """BLPOP ``key`` until ``deadline`` (monotonic), at most :data:`BLOCK_SLICE` per round trip.

        Rides out a state Redis that is unreachable for a while (a restart):
        the wait goes on until the deadline.

        Raises:
            redis.ConnectionError: the server was unreachable when the deadline came.
        """
        delay = 0.05
        while (left := deadline - time.monotonic()) > 0:
            try:
                popped = self.command("BLPOP", key, _block_seconds(left))
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() + delay >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_BACKOFF_MAX)
                continue
            delay = 0.05
            if popped is not None:
                return str(popped[1])
        return None

    def command(self, *args: Any) -> Any:
        connection = self._take()
        try:
            try:
                connection.send_command(*args)
                reply = connection.read_response()
            except (redis.ConnectionError, redis.TimeoutError):
                connection.disconnect()
                connection.send_command(*args)
                reply = connection.read_response()
        except redis.ResponseError:
            self._give(connection)  # an error reply leaves the connection in step
            raise
        except BaseException:
            # Interrupted mid-command (a timeout, a signal): a reply may still
            # be on its way, so this socket is never reused.
            connection.disconnect()
            raise
        self._give(connection)
        return reply

    def close(self) -> None:
        """Close the idle connections (those in use close when given back)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.disconnect()

    def _take(self) -> Any:
        with self._lock:
            if self._pid != os.getpid():
                # A forked child never uses its parent's sockets.
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        # Made outside the client pool's count (max_connections): these are
        # bounded by the callers in flight, not by that pool.
        return self._pool.connection_class(**self._pool.connection_kwargs)

    def _give(self, connection: Any) -> None:
        with self._lock:
            if len(self._idle) < self.KEEP_IDLE and self._pid == os.getpid():
                self._idle.append(connection)
                return
        connection.disconnect()


def _block_seconds(left: float) -> float:
    # BLPOP takes its timeout in seconds with millisecond precision; 0 would block forever.
    return max(0.001, round(min(left, BLOCK_SLICE), 3))


@functools.cache
def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


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
    args = [CLAIM_TTL, encode_error(task_id, expired, ""), REPLY_TTL, result_ttl or REPLY_TTL]
    return [_GIVE_UP, len(names), *names, *args]


def give_up(
    scripts: Scripts, task_id: str, reply_to: str = "", result: str = "", result_ttl: int = 0
) -> tuple[str, int]:
    """The caller stops waiting for an agent: ``("", 0)`` when it won (the call never runs), else (owner, attempts).

    When it wins, a :class:`~poolq.errors.CheckoutTimeout` reply goes to
    ``reply_to`` and ``result`` (a cast's result key), if given.
    """
    script, count, *rest = give_up_command(task_id, reply_to, result, result_ttl)
    owner, *attempts = scripts.run(script, keys=rest[:count], args=rest[count:])
    return str(owner or ""), int(attempts[0]) if attempts else 0


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
) -> None:
    """In one round trip: push the reply (and keep a cast's result), close the claim, set the agent's state.

    With ``retry_until`` (monotonic), a state Redis that is unreachable (a
    restart) is tried again until then, so a call that finished during the
    outage still reaches its caller.
    """
    names = [reply_to or keys.reply(task_id), keys.claim(task_id), keys.agent(agent_id) if agent_id else "", stats_key]
    args = [reply, REPLY_TTL, CLAIM_TTL, now, requests_done, int(ran), agent_state, result_ttl or REPLY_TTL]
    if retry_until is None:
        scripts.run(_FINISH, keys=[*names, result], args=args)
    else:
        scripts.run_until(retry_until, _FINISH, keys=[*names, result], args=args)


def nesting(value: Any, limit: int = MAX_NESTING) -> int:
    """How deep lists and dicts nest in ``value`` (0 for a scalar), without recursion.

    Stops counting once past ``limit``.
    """
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def argument_nesting(body: Any) -> int:
    """The nesting of the deepest argument in a message body (``[args, kwargs, ...]``)."""
    return max(0, nesting(body, MAX_NESTING + 2) - 2)


def check_arguments(pool: str, args: Any, kwargs: Any, max_bytes: int) -> int:
    """The size of the arguments as JSON, once they are found plain JSON, not too deep nor too big.

    Raises:
        InvalidPayload
    """
    if argument_nesting([args, kwargs]) > MAX_NESTING:
        raise errors.InvalidPayload(
            f"arguments for pool {pool!r} nest more than {MAX_NESTING} levels deep (lists and objects)"
        )
    try:
        body = json.dumps([args, kwargs], allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise errors.InvalidPayload(f"arguments for pool {pool!r} are not plain JSON: {exc}") from None
    size = len(body.encode())
    if size > max_bytes:
        raise errors.InvalidPayload(
            f"arguments for pool {pool!r} are {size} bytes, over the limit of {max_bytes} (max_payload_bytes)"
        )
    return size


def encode_result(task_id: str, result: Any) -> str:
    """The reply for a successful call. Raises TypeError/ValueError if not plain JSON."""
    if nesting(result) > MAX_NESTING:
        raise ValueError(f"the result nests more than {MAX_NESTING} levels deep")
    return json.dumps({"id": task_id, "ok": result}, allow_nan=False, separators=(",", ":"))


def encode_error(task_id: str, exc: BaseException, remote_traceback: str | None = None) -> str:
    """The reply for a failed call: the error's kind (any exception but poolq's is the agent's), type and traceback.

    ``remote_traceback``: the traceback to send; None formats ``exc``'s own.
    """
    kind = exc.kind if isinstance(exc, errors.PoolqError) and exc.kind else "agent"
    remote_type = type(exc).__qualname__
    module = type(exc).__module__
    message = str(exc)
    if isinstance(exc, errors.AgentError):
        # Already the remote side's description (AgentCrashed: WorkerLost).
        remote_type, message = exc.remote_type, exc.message
    elif module not in ("builtins", "__main__"):
        remote_type = f"{module}.{remote_type}"
    if remote_traceback is None:
        remote_traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    error = {"kind": kind, "type": remote_type, "message": message, "traceback": remote_traceback}
    return json.dumps({"id": task_id, "error": error}, separators=(",", ":"))


def decode_reply(raw: str) -> Any:
    """The result in a reply, or the typed error it carries, raised."""
    return result_of(json.loads(raw))


def result_of(document: dict[str, Any]) -> Any:
    """The result in a parsed reply, or the typed error it carries, raised."""
    if "ok" in document:
        return document["ok"]
    raise error_from(document["error"])


def error_from(error: dict[str, str]) -> errors.PoolqError:
    """The client-side exception for a reply's error document."""
    cls = _ERROR_KINDS.get(error["kind"], errors.AgentError)
    if issubclass(cls, errors.AgentError):
        return cls(error["type"], error["message"], error.get("traceback", ""))
    return cls(error["message"])


# -- leases: what the client and the agent say on the lease's two lists -------


@dataclass(frozen=True)
class LeaseRequest:
    """One message on a lease's request list (client to agent): a call, or the release."""

    seq: int = 0
    op: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    call_timeout: float = 0.0
    release: bool = False
    broken: bool = False

    def encode(self) -> str:
        if self.release:
            return json.dumps({"release": True, "broken": self.broken})
        call = {"seq": self.seq, "op": self.op, "args": self.args, "kwargs": self.kwargs}
        return json.dumps({**call, "call_timeout": self.call_timeout})

    @classmethod
    def decode(cls, raw: str) -> LeaseRequest:
        message = json.loads(raw)
        if "release" in message:
            return cls(release=True, broken=bool(message.get("broken")))
        return cls(
            seq=int(message["seq"]),
            op=message.get("op"),
            args=list(message.get("args", [])),
            kwargs=dict(message.get("kwargs", {})),
            call_timeout=float(message.get("call_timeout") or 0),
        )


def lease_grant(agent_id: str, name: str) -> str:
    """The agent's first message on the reply list: it serves the lease."""
    return json.dumps({"granted": agent_id, "name": name})


def lease_ended(reason: str, message: str = "") -> str:
    """The agent's last message on the reply list: the lease ended (it could not start, or a call broke it)."""
    return json.dumps({"ended": reason, "message": message})


def lease_reply(seq: int, reply: str) -> str:
    """The reply to lease call ``seq`` (a call's reply, numbered)."""
    return json.dumps({**json.loads(reply), "seq": seq})


def read_lease_grant(raw: str) -> tuple[str, str]:
    """The (agent id, name) that took the lease.

    Raises:
        AgentUnavailable: the agent could not be set up; or the worker's error reply.
    """
    document = json.loads(raw)
    if "ended" in document:
        raise errors.AgentUnavailable(document.get("message", "") or document["ended"])
    if "granted" not in document:
        result_of(document)  # the worker's error reply: raises it
    return str(document["granted"]), str(document["name"])


def read_lease_reply(raw: str, seq: int, lease_id: str) -> tuple[bool, Any]:
    """Read a message of the reply list: (False, None) when it answers an earlier call, else (True, result).

    Raises:
        LeaseLost: the lease ended; the error the reply carries.
    """
    document = json.loads(raw)
    if "ended" in document:
        raise errors.LeaseLost(f"lease {lease_id} ended: {document['ended']}")
    if document.get("seq", seq) != seq:
        return False, None  # a late reply to an earlier call that timed out
    return True, result_of(document)


def deadline_after(seconds: float | None) -> float | None:
    """The epoch time ``seconds`` from now (a call's deadline header), or None."""
    if seconds is None or math.isinf(seconds):
        return None
    return time.time() + seconds
