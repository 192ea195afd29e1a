"""The agent registry: what every agent is doing, kept in the state Redis.

Each agent owns a hash ``poolq:agent:<agent id>`` that expires unless its
process refreshes it (the heartbeat), so a dead process drops out of the
registry within :data:`HEARTBEAT_TTL` seconds, busy or idle. Each pool keeps
the set of its agent ids in ``poolq:pool:<pool>:agents``.

Nothing here is needed for the delivery of calls: it is the view that status,
tests and maintenance read. The call path updates it inside its own round
trips (see :mod:`poolq.store.protocol`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from . import keys, metrics
from .records import AgentRecord, NodeRecord

#: Seconds between two heartbeats of a live agent process.
HEARTBEAT_INTERVAL = 2.0
#: Seconds after the last heartbeat at which an agent counts as gone.
HEARTBEAT_TTL = 3 * HEARTBEAT_INTERVAL
#: Seconds after the last heartbeat at which status shows an agent as ``lost``
#: (its process is most likely dead; its record expires at HEARTBEAT_TTL).
HEARTBEAT_STALE = 2 * HEARTBEAT_INTERVAL

# KEYS: agents set, nodes set, stats hash, queue list ('' when the queue lives
# elsewhere).  ARGV: the prefixes of agent and node records (keys.py).
# Returns {agents, nodes, stats, queue length, server time}: every record of a
# pool in one round trip whatever the number of agents, pruning the ids whose
# heartbeat lapsed.
_SNAPSHOT = """
local function records(members, prefix)
  local out = {}
  for _, id in ipairs(redis.call('SMEMBERS', members)) do
    local fields = redis.call('HGETALL', prefix .. id)
    if #fields == 0 then
      redis.call('SREM', members, id)
    else
      table.insert(out, id)
      table.insert(out, fields)
    end
  end
  return out
end
local waiting = -1
if KEYS[4] ~= '' then waiting = redis.call('LLEN', KEYS[4]) end
local t = redis.call('TIME')
return {records(KEYS[1], ARGV[1]), records(KEYS[2], ARGV[2]), redis.call('HGETALL', KEYS[3]), waiting,
        t[1] .. '.' .. string.format('%06d', t[2])}
"""


logger = logging.getLogger("poolq.store")


#: Scale events kept per pool (newest first).
SCALE_EVENTS_KEPT = 100


def count(client: redis.Redis, pool: str, **increments: int) -> None:
    """Add to the pool's counters (requests, recycles, spawned, terminated, ...)."""
    pipe = client.pipeline(transaction=False)
    for name, amount in increments.items():
        pipe.hincrby(keys.stats(pool), name, amount)
    pipe.execute()


def record_scale(
    client: redis.Redis, pool: str, direction: str, before: int, after: int, reason: str, now: float, node: str = ""
) -> None:
    """Record a scale event (up or down) in the pool's counters and its event list."""
    event = {"at": now, "direction": direction, "from": before, "to": after, "reason": reason, "node": node}
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(keys.stats(pool), f"scale_{direction}s", 1)
    pipe.hset(keys.stats(pool), mapping={f"last_scale_{k}": _flat(v) for k, v in event.items()})
    pipe.lpush(keys.scale_events(pool), json.dumps(event))
    pipe.ltrim(keys.scale_events(pool), 0, SCALE_EVENTS_KEPT - 1)
    pipe.execute()


def scale_events(client: redis.Redis, pool: str) -> list[dict[str, Any]]:
    """The pool's recent scale events, newest first."""
    return [json.loads(raw) for raw in client.lrange(keys.scale_events(pool), 0, -1)]


def publish(client: redis.Redis, pool: str, agent_id: str, fields: Mapping[str, Any]) -> None:
    """Write an agent's whole record and (re)start its heartbeat TTL."""
    _publish(client, keys.agent(agent_id), keys.pool_agents(pool), agent_id, fields)


def publish_node(client: redis.Redis, pool: str, node: str, fields: Mapping[str, Any]) -> None:
    """Write a worker node's record (its main process) and (re)start its TTL."""
    _publish(client, keys.node(node), keys.pool_nodes(pool), node, fields)


# KEYS: the record, its pool's member set.  ARGV: ttl, member, then field/value
# pairs.  Writing a record is its first heartbeat: stamped with the server's
# time like every later one, so a process killed before its next beat still
# shows as lost (not as it was) until its record expires.
_PUBLISH = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'beat_at', t[1] .. '.' .. string.format('%06d', t[2]), unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
"""


def _publish(client: redis.Redis, key: str, members: str, member: str, fields: Mapping[str, Any]) -> None:
    pairs = [item for k, v in fields.items() for item in (k, _flat(v))]
    client.register_script(_PUBLISH)(keys=[key, members], args=[int(HEARTBEAT_TTL), member, *pairs])


def remove(client: redis.Redis, pool: str, agent_id: str) -> None:
    """Drop an agent that stopped."""
    _remove(client, keys.agent(agent_id), keys.pool_agents(pool), agent_id)


def remove_node(client: redis.Redis, pool: str, node: str) -> None:
    """Drop a worker node that stopped."""
    _remove(client, keys.node(node), keys.pool_nodes(pool), node)


def _remove(client: redis.Redis, key: str, members: str, member: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.delete(key)
    pipe.srem(members, member)
    pipe.execute()


# KEYS: the pool's nodes set, its stats.  ARGV: node key prefix, reason.
# Marks the pool skipped unless one of its nodes is alive.
_MARK_SKIPPED = """
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. node) == 1 then return 0 end
end
redis.call('HSET', KEYS[2], 'skipped', ARGV[2])
return 1
"""


def mark_skipped(client: redis.Redis, pool: str, reason: str) -> bool:
    """Say that no node runs ``pool`` on purpose (its requirements are missing); False when a node runs it.

    Calls to it fail at once with PoolClosed, and its status says ``skipped``,
    until one of its nodes starts (:func:`reopen`).
    """
    return bool(client.eval(_MARK_SKIPPED, 2, keys.pool_nodes(pool), keys.stats(pool), keys.NODE_PREFIX, reason))


def reopen(client: redis.Redis, pool: str) -> None:
    """A node of ``pool`` starts: the pool is neither closed (``poolq stop``) nor skipped any more."""
    client.hdel(keys.stats(pool), "closed", "skipped")


@dataclass(frozen=True)
class Snapshot:
    """Every registry record of one pool, read at one instant."""

    agents: list[AgentRecord]
    nodes: list[NodeRecord]
    stats: dict[str, str]
    #: Calls in the pool's queue, or None when the queue is not in this Redis.
    waiting: int | None
    #: The state Redis's clock when the snapshot was read (heartbeats are stamped by it).
    server_time: float = 0.0


def snapshot(client: redis.Redis, pool: str, queue: str = "") -> Snapshot:
    """Read the pool's agents, nodes and counters (and ``queue``'s length, if given) in one round trip."""
    agents, nodes, stats, waiting, server_time = client.eval(
        _SNAPSHOT,
        4,
        keys.pool_agents(pool),
        keys.pool_nodes(pool),
        keys.stats(pool),
        queue,
        keys.AGENT_PREFIX,
        keys.NODE_PREFIX,
    )
    return Snapshot(
        agents=[AgentRecord.parse(str(id_), _pairs(fields)) for id_, fields in _records(agents)],
        nodes=[NodeRecord.parse(str(id_), _pairs(fields)) for id_, fields in _records(nodes)],
        stats=_pairs(stats),
        waiting=None if int(waiting) < 0 else int(waiting),
        server_time=float(server_time),
    )


def _records(flat: list[Any]) -> list[tuple[Any, list[Any]]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


# KEYS: records.  ARGV: ttl, then field/value pairs for every record.
# Refreshes each live record and stamps it with the server's time (one clock
# for every host); returns the keys that had vanished.
_BEAT = """
local missing = {}
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', t[2])
for _, key in ipairs(KEYS) do
  if redis.call('EXPIRE', key, ARGV[1]) == 1 then
    redis.call('HSET', key, 'beat_at', now)
    if #ARGV > 1 then redis.call('HSET', key, unpack(ARGV, 2)) end
  else
    table.insert(missing, key)
  end
end
return missing
"""


class Heartbeat:
    """A daemon thread that keeps records alive while their process lives.

    Every :data:`HEARTBEAT_INTERVAL` it refreshes the TTL of each key that
    ``keys()`` returns and writes ``fields()`` into them (in one round trip),
    calls ``republish(key)`` for a record that vanished (for example after the
    state Redis restarted), writes this process's call metrics
    (:data:`poolq.store.metrics.recorder`), then calls ``after()``.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Callable[[], Iterable[str]],
        republish: Callable[[str], None],
        fields: Callable[[], Mapping[str, Any]] | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self._keys = keys
        self._republish = republish
        self._fields = fields
        self._after = after
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poolq-heartbeat", daemon=True)
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        while not self._stopping.wait(HEARTBEAT_INTERVAL):
            try:
                keys = list(self._keys())
                extra = [item for k, v in (self._fields() if self._fields else {}).items() for item in (k, _flat(v))]
                for key in self._client.eval(_BEAT, len(keys), *keys, int(HEARTBEAT_TTL), *extra):
                    self._republish(str(key))
            except redis.RedisError as exc:
                # Said once per outage, not every beat.
                if not self._failing:
                    logger.warning("the registry is unreachable (%s); its records lapse until it is back", exc)
                self._failing = True
                continue
            if self._failing:
                logger.warning("the registry is reachable again")
                self._failing = False
            try:
                metrics.recorder.flush(self._client)
                if self._after is not None:
                    self._after()
            except Exception:
                logger.exception("heartbeat hook failed")


#: What :func:`setup_failed` found: the breaker stays closed, was open already, or opened now.
BREAKER_CLOSED, BREAKER_OPEN, BREAKER_OPENED = 0, 1, 2

# KEYS: failures zset, stats hash.  ARGV: now, window, threshold, reset, error, member.
# Records a failed setup; opens the breaker when the window holds threshold failures.
_SETUP_FAILED = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
redis.call('HSET', KEYS[2], 'last_setup_error', ARGV[5])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local was = redis.call('HGET', KEYS[2], 'breaker')
  redis.call('HSET', KEYS[2], 'breaker', 'open', 'breaker_until', tonumber(ARGV[1]) + tonumber(ARGV[4]),
             'breaker_error', ARGV[5])
  if was == 'open' then return 1 end
  return 2
end
return 0
"""


def setup_failed(
    client: redis.Redis, pool: str, error: str, now: float, window: float, threshold: int, reset: float, member: str
) -> int:
    """Count a failed setup; whether the pool's circuit breaker is closed, open, or opened by this failure."""
    return int(
        client.eval(
            _SETUP_FAILED, 2, keys.setup_failures(pool), keys.stats(pool), now, window, threshold, reset, error, member
        )
    )


def setup_succeeded(client: redis.Redis, pool: str) -> bool:
    """A setup worked: close the breaker and forget the failures; whether the breaker was open."""
    pipe = client.pipeline(transaction=False)
    pipe.hget(keys.stats(pool), "breaker")
    pipe.hset(keys.stats(pool), "breaker", "closed")
    pipe.delete(keys.setup_failures(pool))
    return bool(pipe.execute()[0] == "open")


def breaker_open(stats: Mapping[str, str], now: float) -> bool:
    """Whether the pool's breaker is open (failing calls fast) at ``now``; past its reset time it is half-open."""
    return stats.get("breaker") == "open" and now < float(stats.get("breaker_until") or 0)


def is_alive(client: redis.Redis, agent_id: str) -> bool:
    """Whether an agent's heartbeat is current."""
    return bool(client.exists(keys.agent(agent_id)))


def _flat(value: Any) -> str | int | float:
    if isinstance(value, (int, float, str)):
        return value
    return "" if value is None else str(value)
