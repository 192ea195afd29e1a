"""When an agent must be replaced although it still works, and whose turn it is to recycle in place."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import redis

from ..config import PoolConfig
from ..store import keys
from .slot import AgentSlot
from .usage import CpuWindow, rss_mb

#: What can set a recycle off. Every recycle reason starts with one of them and a colon.
TRIGGERS = (
    "max_requests",
    "max_age",
    "max_memory",
    "max_cpu",
    "health",  # failed its health check (idle, before a call, or after it raised)
    "call_timeout",  # interrupted mid-operation
    "lease",  # a lease ended broken
    "reset",  # reset() raised
    "setup",  # maintenance replaces an agent whose setup failed
)

#: Seconds the pool-wide turn to recycle in place is held at most (a recycle that dies frees it then).
RECYCLE_TURN_MAX = 600.0

# KEYS: turn.  ARGV: holder.  Gives the turn back only if this agent holds it.
_GIVE_TURN = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def limit_reached(pool: PoolConfig, slot: AgentSlot, cpu: CpuWindow | None) -> str:
    """Why the agent must be replaced (requests, age, memory, CPU), or '' when it need not."""
    if slot.requests >= slot.requests_limit:
        return f"max_requests: {slot.requests} requests (limit {pool.max_requests})"
    if time.time() - slot.started_at >= slot.age_limit:
        return f"max_age: older than {pool.max_age:g}s"
    if pool.max_memory_mb is not None and rss_mb() > pool.max_memory_mb:
        return f"max_memory: {rss_mb():.0f} MB (limit {pool.max_memory_mb:g} MB)"
    if cpu is not None and pool.max_cpu_percent is not None:
        used = cpu.average()
        if used is not None and used > pool.max_cpu_percent:
            return f"max_cpu: {used:.0f}% for {pool.cpu_window:g}s (limit {pool.max_cpu_percent:g}%)"
    return ""


def trigger_of(reason: str) -> str:
    """What set a recycle off: the word before the colon of its reason (see :data:`TRIGGERS`), else 'other'."""
    word = reason.partition(":")[0].strip()
    return word if word in TRIGGERS else "other"


@contextlib.contextmanager
def recycle_turn(state: redis.Redis, pool: str, holder: str) -> Iterator[bool]:
    """The pool-wide turn to recycle in place (one agent of the pool out of service at a time): whether it is ours.

    Given back when the block ends.
    """
    key = keys.recycle_turn(pool)
    try:
        ours = bool(state.set(key, holder, nx=True, px=int(RECYCLE_TURN_MAX * 1000)))
    except redis.RedisError:
        ours = True  # cannot coordinate: recycle (the limit was reached)
    try:
        yield ours
    finally:
        if ours:
            with contextlib.suppress(redis.RedisError):
                state.eval(_GIVE_TURN, 1, key, holder)
