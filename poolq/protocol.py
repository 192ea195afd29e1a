"""What crosses Redis between a poolq client and a poolq worker, besides the task.

Celery carries the task message (broker queue ``poolq.<pool>``, acks late).
Around it poolq keeps two small records in its state Redis:

**The claim** (``poolq:claim:<task id>``, a hash: owner, attempts). Before an
agent runs a call, its worker claims the task atomically; a client whose
``timeout`` ran out claims it as ``expired``. Whoever claims first decides,
so a call that raised :class:`~poolq.errors.CheckoutTimeout` can never run
later, whatever the clocks say. The same record makes redeliveries safe: a
copy redelivered while its first run is alive is skipped (Redis visibility
timeout), a copy whose runner died is taken over (kill -9 mid-task), and a
copy that killed ``max_deliveries`` runners fails as a poison pill.

**The reply** (``poolq:reply:<task id>``, a list): the worker pushes one JSON
document and the client ``BLPOP``\\ s it. This replaces Celery's result
backend for ``call``: no SUBSCRIBE/UNSUBSCRIBE per call and no stored result.
``cast`` keeps Celery's result backend, so its result can be read by id from
any process.

The agent's registry record is updated inside the same round trips (claim:
busy; done: idle), so the registry costs the call path nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import redis

from . import errors

#: Celery message headers poolq adds to a call: the operation, and the Redis
#: list the reply goes to (none for a cast).
HEADER_OP = "poolq_op"
HEADER_REPLY = "poolq_reply"
#: A lease request carries its lease id and its idle TTL in seconds.
HEADER_LEASE = "poolq_lease"
HEADER_LEASE_TTL = "poolq_lease_ttl"

#: Seconds a state Redis socket may stay silent before the client gives up on it.
SOCKET_TIMEOUT = 10.0
#: Longest single BLPOP, kept below SOCKET_TIMEOUT.
BLOCK_SLICE = 8.0
#: Seconds a caller waits past ``call_timeout`` for the worker's own timeout reply.
CALL_GRACE = 2.0
#: Seconds an unread reply is kept (the caller may have given up).
REPLY_TTL = 300
#: Seconds a claim outlives its task; must exceed the broker's visibility
#: timeout so a late redelivery still finds it.
CLAIM_TTL = 2 * 3600

EXPIRED = "expired"
DONE = "done"

_ERROR_KINDS: dict[str, type[errors.PoolqError]] = {
    "unknown_operation": errors.UnknownOperation,
    "invalid_arguments": errors.InvalidArguments,
    "call_timeout": errors.CallTimeout,
    "checkout_timeout": errors.CheckoutTimeout,
    "unavailable": errors.AgentUnavailable,
    "degraded": errors.PoolDegraded,
    "invalid_payload": errors.InvalidPayload,
    "lease_lost": errors.LeaseLost,
}


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
        socket_keepalive=True,
    )
    return redis.Redis(connection_pool=pool)


def reply_key(task_id: str) -> str:
    return f"poolq:reply:{task_id}"


def claim_key(task_id: str) -> str:
    return f"poolq:claim:{task_id}"


def agent_key(agent_id: str) -> str:
    return f"poolq:agent:{agent_id}"


def lease_requests_key(lease_id: str) -> str:
    """Where the lease's client pushes requests and the agent pops them."""
    return f"poolq:lease:{lease_id}:requests"


def lease_replies_key(lease_id: str) -> str:
    """Where the agent pushes the grant, the replies, and the end of the lease."""
    return f"poolq:lease:{lease_id}:replies"


# KEYS: claim, agent.  ARGV: owner, claim ttl, now, task id.
# Returns {"run", attempts} when this owner got the claim, else {owner, attempts}.
_CLAIM = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
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

# KEYS: reply, claim, agent, pool stats.  ARGV: reply ('' for none), reply
# ttl, claim ttl, now, agent requests, 1 if the operation ran, the agent's
# state from now on.  The agent
# record is only touched while its heartbeat lives, so a late finish cannot
# resurrect a record without a TTL.
_FINISH = """
if ARGV[1] ~= '' then
  redis.call('RPUSH', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
redis.call('HSET', KEYS[2], 'owner', 'done')
redis.call('EXPIRE', KEYS[2], ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'state', ARGV[7], 'last_used_at', ARGV[4], 'requests', ARGV[5], 'task', '')
end
if ARGV[6] == '1' then
  redis.call('HINCRBY', KEYS[4], 'requests', 1)
end
return 1
"""

# KEYS: claim.  ARGV: claim ttl.  Returns 1 when the caller's expiry won.
EXPIRE_SCRIPT = """
if redis.call('HSETNX', KEYS[1], 'owner', 'expired') == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Claim:
    """The outcome of a worker's claim on a task."""

    run: bool
    owner: str = ""
    attempts: int = 1


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

    def pop(self, key: str, seconds: float) -> str | None:
        """BLPOP ``key`` for up to ``seconds``, at most :data:`BLOCK_SLICE` per round trip."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            popped = self.command("BLPOP", key, round(min(left, BLOCK_SLICE), 3))
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


@functools.cache
def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def claim(scripts: Scripts, task_id: str, owner: str, agent_id: str, now: float) -> Claim:
    """Claim ``task_id`` for ``owner``; say who holds it otherwise."""
    verdict, attempts = scripts.run(
        _CLAIM, keys=[claim_key(task_id), agent_key(agent_id)], args=[owner, CLAIM_TTL, now, task_id]
    )
    # Our own name: a retried claim whose first answer was lost on the way.
    if verdict in ("run", owner):
        return Claim(run=True, owner=owner, attempts=int(attempts))
    return Claim(run=False, owner=verdict, attempts=int(attempts))


def take_over(scripts: Scripts, task_id: str, owner: str, dead_owner: str, agent_id: str, now: float) -> int:
    """Take the claim of a dead runner; the new attempt count, or -1 if it moved."""
    return int(
        scripts.run(
            _TAKEOVER,
            keys=[claim_key(task_id), agent_key(agent_id)],
            args=[owner, dead_owner, CLAIM_TTL, now, task_id],
        )
    )


def expire(scripts: Scripts, task_id: str) -> bool:
    """Mark a call as given up by its caller; True when no agent had started it."""
    return bool(scripts.run(EXPIRE_SCRIPT, keys=[claim_key(task_id)], args=[CLAIM_TTL]))


def finish(
    scripts: Scripts,
    task_id: str,
    reply: str | None,
    reply_to: str,
    agent_id: str,
    stats_key: str,
    requests_done: int,
    ran: bool,
    now: float,
    agent_state: str = "idle",
) -> None:
    """In one round trip: push the reply, close the claim, set the agent's state, count the call."""
    scripts.run(
        _FINISH,
        keys=[reply_to or reply_key(task_id), claim_key(task_id), agent_key(agent_id), stats_key],
        args=[reply or "", REPLY_TTL, CLAIM_TTL, now, requests_done, int(ran), agent_state],
    )


def encode_result(task_id: str, result: Any) -> str:
    """The reply for a successful call. Raises TypeError/ValueError if not plain JSON."""
    return json.dumps({"id": task_id, "ok": result}, allow_nan=False, separators=(",", ":"))


def encode_error(task_id: str, kind: str, exc: BaseException, remote_traceback: str | None = None) -> str:
    """The reply for a failed call, with the remote type and traceback as text."""
    remote_type = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__"):
        remote_type = f"{module}.{remote_type}"
    if remote_traceback is None:
        remote_traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    error = {"kind": kind, "type": remote_type, "message": str(exc), "traceback": remote_traceback}
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
    cls = _ERROR_KINDS.get(error["kind"])
    if cls is not None:
        return cls(error["message"])
    if error["kind"] == "crashed":
        return errors.AgentCrashed(error["type"], error["message"], error.get("traceback", ""))
    return errors.AgentError(error["type"], error["message"], error.get("traceback", ""))
