"""The agent registry: what every agent is doing, kept in the state Redis.

Each agent owns a hash ``poolq:agent:<agent id>`` that expires unless its
process refreshes it (the heartbeat), so a dead process drops out of the
registry within :data:`HEARTBEAT_TTL` seconds, busy or idle. Each pool keeps
the set of its agent ids in ``poolq:pool:<pool>:agents``.

Nothing here is needed for the delivery of calls: it is the view that status,
tests and maintenance read. The call path updates it inside its own round
trips (see :mod:`poolq.protocol`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis

from .protocol import agent_key

#: Seconds between two heartbeats of a live agent process.
HEARTBEAT_INTERVAL = 2.0
#: Seconds after the last heartbeat at which an agent counts as gone.
HEARTBEAT_TTL = 3 * HEARTBEAT_INTERVAL

# KEYS: a member set.  ARGV: the records' key prefix. Returns a flat list of
# [id, fields...] and prunes dead ids: status is one round trip whatever the
# number of agents.
_READ_POOL = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local fields = redis.call('HGETALL', ARGV[1] .. id)
  if #fields == 0 then
    redis.call('SREM', KEYS[1], id)
  else
    table.insert(out, id)
    table.insert(out, fields)
  end
end
return out
"""


logger = logging.getLogger("poolq.registry")


def pool_agents_key(pool: str) -> str:
    return f"poolq:pool:{pool}:agents"


def pool_nodes_key(pool: str) -> str:
    return f"poolq:pool:{pool}:nodes"


def node_key(node: str) -> str:
    return f"poolq:node:{node}"


def stats_key(pool: str) -> str:
    return f"poolq:pool:{pool}:stats"


def scale_events_key(pool: str) -> str:
    return f"poolq:pool:{pool}:scale_events"


#: Scale events kept per pool (newest first).
SCALE_EVENTS_KEPT = 100


def count(client: redis.Redis, pool: str, **increments: int) -> None:
    """Add to the pool's counters (requests, recycles, spawned, terminated, ...)."""
    pipe = client.pipeline(transaction=False)
    for name, amount in increments.items():
        pipe.hincrby(stats_key(pool), name, amount)
    pipe.execute()


def record_scale(
    client: redis.Redis, pool: str, direction: str, before: int, after: int, reason: str, now: float, node: str = ""
) -> None:
    """Record a scale event (up or down) in the pool's counters and its event list."""
    event = {"at": now, "direction": direction, "from": before, "to": after, "reason": reason, "node": node}
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(stats_key(pool), f"scale_{direction}s", 1)
    pipe.hset(stats_key(pool), mapping={f"last_scale_{k}": _flat(v) for k, v in event.items()})
    pipe.lpush(scale_events_key(pool), json.dumps(event))
    pipe.ltrim(scale_events_key(pool), 0, SCALE_EVENTS_KEPT - 1)
    pipe.execute()


def scale_events(client: redis.Redis, pool: str) -> list[dict[str, Any]]:
    """The pool's recent scale events, newest first."""
    return [json.loads(raw) for raw in client.lrange(scale_events_key(pool), 0, -1)]


def publish(client: redis.Redis, pool: str, agent_id: str, fields: Mapping[str, Any]) -> None:
    """Write an agent's whole record and (re)start its heartbeat TTL."""
    _publish(client, agent_key(agent_id), pool_agents_key(pool), agent_id, fields)


def publish_node(client: redis.Redis, pool: str, node: str, fields: Mapping[str, Any]) -> None:
    """Write a worker node's record (its main process) and (re)start its TTL."""
    _publish(client, node_key(node), pool_nodes_key(pool), node, fields)


def _publish(client: redis.Redis, key: str, members: str, member: str, fields: Mapping[str, Any]) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, mapping={k: _flat(v) for k, v in fields.items()})
    pipe.expire(key, int(HEARTBEAT_TTL))
    pipe.sadd(members, member)
    pipe.execute()


def remove(client: redis.Redis, pool: str, agent_id: str) -> None:
    """Drop an agent that stopped."""
    _remove(client, agent_key(agent_id), pool_agents_key(pool), agent_id)


def remove_node(client: redis.Redis, pool: str, node: str) -> None:
    """Drop a worker node that stopped."""
    _remove(client, node_key(node), pool_nodes_key(pool), node)


def _remove(client: redis.Redis, key: str, members: str, member: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.delete(key)
    pipe.srem(members, member)
    pipe.execute()


def read_pool(client: redis.Redis, pool: str) -> list[dict[str, str]]:
    """Every live agent of ``pool``, as a dict of its record (plus ``id``)."""
    return _read(client, pool_agents_key(pool), "poolq:agent:")


def read_nodes(client: redis.Redis, pool: str) -> list[dict[str, str]]:
    """Every live worker node of ``pool``, as a dict of its record (plus ``id``)."""
    return _read(client, pool_nodes_key(pool), "poolq:node:")


def _read(client: redis.Redis, members: str, prefix: str) -> list[dict[str, str]]:
    flat = client.eval(_READ_POOL, 1, members, prefix)
    records = []
    for i in range(0, len(flat), 2):
        fields = flat[i + 1]
        record = {fields[j]: fields[j + 1] for j in range(0, len(fields), 2)}
        record["id"] = flat[i]
        records.append(record)
    return records


class Heartbeat:
    """A daemon thread that keeps records alive while their process lives.

    Every :data:`HEARTBEAT_INTERVAL` it refreshes the TTL of each key that
    ``keys()`` returns, and calls ``republish(key)`` for a record that vanished
    (for example after the state Redis restarted).
    """

    def __init__(
        self, client: redis.Redis, keys: Callable[[], Iterable[str]], republish: Callable[[str], None]
    ) -> None:
        self._client = client
        self._keys = keys
        self._republish = republish
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poolq-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        while not self._stopping.wait(HEARTBEAT_INTERVAL):
            try:
                keys = list(self._keys())
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.expire(key, int(HEARTBEAT_TTL))
                for key, alive in zip(keys, pipe.execute(), strict=True):
                    if not alive:
                        self._republish(key)
            except redis.RedisError:
                logger.warning("heartbeat to the registry failed", exc_info=True)


def is_alive(client: redis.Redis, agent_id: str) -> bool:
    """Whether an agent's heartbeat is current."""
    return bool(client.exists(agent_key(agent_id)))


def _flat(value: Any) -> str | int | float:
    if isinstance(value, (int, float, str)):
        return value
    return "" if value is None else str(value)
