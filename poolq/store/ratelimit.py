"""The pool-wide rate limit: a sliding-window log in the state Redis, shared by every node and client.

A pool with ``rate_limit = "20/s"`` lets at most 20 of its operations start in
any one-second window, on whichever node they run and from whichever client
they come. The log is one sorted set per pool (:func:`poolq.store.keys.rate_window`):
a member per operation let through, scored by the Redis server's clock at
that moment. An operation may start when fewer than ``calls`` members lie
within the last window; the script that says so adds its member in the same
step, atomically, so two workers never take the last slot together. Every
time is the server's (``TIME``): hosts whose clocks disagree share one window.

The algorithm is exact, unlike a token bucket, whose burst lets ``2R`` through
in a window that straddles a refill: of any ``R + 1`` operations let through,
the first and the last lie at least a window apart.

The window is :data:`GUARD` wider than the configured one: a slot is granted
on the server, and its operation starts a moment later in the worker (the
reply's way back, the ``CallStarted`` event). Widening the window by more than
that lag keeps the *starts*, not only the grants, within the limit.

A worker takes a slot right before the operation runs (after its claim, its
agent's health check and the binding of the arguments), waiting for one when
the window is full: see :func:`wait`. A client with ``block=False`` only looks
(:func:`peek`): it takes no slot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import RateLimit
from . import keys
from .connection import Scripts

#: Seconds by which the window is wider than the configured one: more than the
#: lag between a grant (on the server) and its operation's start (in the worker),
#: a millisecond or two, so scheduling hiccups stay covered. It costs 5% of the
#: rate at "/s", nothing noticeable at "/m" or "/h".
GUARD = 0.05
#: Counter (in the pool's stats) of the operations that had to wait for a slot.
DELAYED = "rate_delayed"

# KEYS: window, stats.  ARGV: calls, window seconds, member, deadline (epoch
# seconds on the server's clock; '' for none), '1' on a call's first try.
# Returns {1, '0'} when the slot is taken; {0, wait} when the window is full,
# wait being the seconds until its calls-th newest member leaves it (cut at the
# deadline); {0, '-1'} when it is full and the deadline has passed. A first
# try that must wait counts the operation as delayed.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local calls, window = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < calls then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
  return {1, '0'}
end
if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[2], 'rate_delayed', 1) end
local wait = tonumber(redis.call('ZRANGE', KEYS[1], -calls, -calls, 'WITHSCORES')[2]) + window - now
if ARGV[4] ~= '' then
  local left = tonumber(ARGV[4]) - now
  if left <= 0 then return {0, '-1'} end
  if left < wait then wait = left end
end
return {0, tostring(wait)}
"""

# KEYS: window.  ARGV: calls, window seconds.  Writes nothing: returns the
# seconds until a slot is free ('0' when one is free now).
_PEEK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local calls, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local inside = redis.call('ZCARD', KEYS[1]) - redis.call('ZCOUNT', KEYS[1], '-inf', now - window)
if inside < calls then return '0' end
return tostring(tonumber(redis.call('ZRANGE', KEYS[1], -calls, -calls, 'WITHSCORES')[2]) + window - now)
"""


@dataclass(frozen=True)
class Grant:
    """One try for a slot: taken, or how long until one may be free."""

    granted: bool
    #: Seconds until a slot may be free (cut at the deadline); 0 when granted.
    wait: float = 0.0
    #: The window is full and the deadline has passed: the operation must not wait longer.
    late: bool = False


def window(rate: RateLimit) -> float:
    """The seconds the limiter counts over: the configured window plus :data:`GUARD`."""
    return rate.per + GUARD


def acquire(
    scripts: Scripts,
    pool: str,
    rate: RateLimit,
    member: str,
    deadline: float | None = None,
    first: bool = True,
    retry_until: float | None = None,
) -> Grant:
    """Take a slot for one operation (``member`` names it: unique per operation and delivery), if one is free.

    ``deadline``: epoch seconds, compared on the Redis server's clock, after
    which a full window makes the grant ``late`` instead of a wait. ``first``:
    the operation's first try (a refusal counts it as delayed). With
    ``retry_until`` (monotonic), an unreachable state Redis is tried again until then.
    """
    names = [keys.rate_window(pool), keys.stats(pool)]
    args = [rate.calls, repr(window(rate)), member, "" if deadline is None else repr(deadline), int(first)]
    granted, wait = scripts.run_until(retry_until, _ACQUIRE, keys=names, args=args)
    seconds = float(wait)
    if int(granted):
        return Grant(granted=True)
    return Grant(granted=False, wait=max(0.0, seconds), late=seconds < 0)


def wait(
    scripts: Scripts,
    pool: str,
    rate: RateLimit,
    member: str,
    deadline: float | None = None,
    until: float | None = None,
    retry: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Take a slot, sleeping until the window has one: True once taken, False when the wait ran out.

    Each refusal says how long until the window's oldest counted member leaves
    it, so the worker sleeps exactly that long, never polls.

    Parameters:
        deadline: epoch seconds on the Redis server's clock (a call's deadline
            for an agent to take it); no waiting past it.
        until: a bound on this host's monotonic clock (a lease call's wait).
        retry: seconds each try keeps trying while the state Redis is unreachable.

    Raises:
        redis.ConnectionError: the state Redis stayed unreachable for ``retry`` seconds.
    """
    first = True
    while True:
        grant = acquire(scripts, pool, rate, member, deadline, first, retry_until=time.monotonic() + retry)
        if grant.granted:
            return True
        if grant.late:
            return False
        pause = grant.wait
        if until is not None:
            left = until - time.monotonic()
            if left <= 0:
                return False
            pause = min(pause, left)
        first = False
        # A millisecond more: waking before the member leaves the window costs a round trip.
        sleep(pause + 0.001)


def peek_command(pool: str, rate: RateLimit) -> list[Any]:
    """The EVAL arguments of :func:`peek`, for any Redis client (the asyncio one too)."""
    return [_PEEK, 1, keys.rate_window(pool), rate.calls, repr(window(rate))]


def peek(scripts: Scripts, pool: str, rate: RateLimit) -> float:
    """Seconds until the pool's window has a free slot (0.0: one is free now); takes none."""
    script, _, key, *args = peek_command(pool, rate)
    return float(scripts.run(script, keys=[key], args=args))
