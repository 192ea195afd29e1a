"""Agent names: readable, unique among live agents, from a name pool in Redis.

Like fnord's NamePool: names are allocated in chunks into a free set; an agent
checks one out when it starts (atomically: SPOP) and checks it back in when it
stops, so the name can serve again. Each checked-out name is recorded against
its agent's (host, pid) and can be looked up by them. Names of agents that died
without checking in are reclaimed when a new chunk is needed.

A node remembers the names of its agents at every heartbeat; when it starts
again (a restart, a new host under the same node name), its agents take those
names back first, so the pool comes back with the names it had.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import redis

from . import keys
from .keys import NAMES_ALL as ALL
from .keys import NAMES_BY_PROCESS as BY_PROCESS
from .keys import NAMES_FREE as FREE

#: Names added to the free set at a time.
CHUNK = 16

_ADJECTIVES = (
    "amber agile bold brave bright brisk calm clever cosmic crisp daring deft eager fair fancy fierce "
    "gentle glad golden grand happy hardy jolly keen kind lively lucky mellow merry mighty nimble noble "
    "patient plucky proud quick quiet rapid ready royal rustic sharp shiny silent silver sleek smart "
    "snappy solid spry steady stellar sturdy sunny swift tidy tough trusty valiant vivid warm wise witty "
    "zesty"
).split()
_NOUNS = (
    "badger bear beaver bison bobcat cheetah condor coyote crane dingo dolphin eagle falcon ferret finch "
    "fox gecko gibbon heron ibex jackal jaguar kestrel koala lemur leopard lynx marmot marten moose "
    "narwhal ocelot orca osprey otter owl panda panther parrot pelican penguin puffin puma quail raven "
    "robin salmon seal shark sparrow stoat swan tapir tiger toucan turtle walrus weasel whale wolf wombat "
    "yak zebra"
).split()

# KEYS: free, all.  ARGV: candidate names. Adds each never-seen name to both sets.
_ADD_CHUNK = """
local added = 0
for _, name in ipairs(ARGV) do
  if redis.call('SADD', KEYS[2], name) == 1 then
    redis.call('SADD', KEYS[1], name)
    added = added + 1
  end
end
return added
"""


def process_key(host: str, pid: int, slot: str = "") -> str:
    return f"{host}:{pid}{slot}"


def checkout(
    client: redis.Redis, agent_id: str, host: str, pid: int, slot: str = "", prefer: Iterable[str] = ()
) -> str:
    """Take a free name for the agent ``agent_id`` running in (host, pid), one of ``prefer`` if one is free."""
    preferred = list(prefer)
    for attempt in range(100):
        name = next((p for p in preferred if client.srem(FREE, p)), "")
        if not name and preferred and attempt == 0 and _reclaim(client):
            continue  # names of agents that died without checking in are free now: look again
        name = name or str(client.spop(FREE) or "")
        if not name:
            _refill(client)
            continue
        client.hset(BY_PROCESS, process_key(host, pid, slot), f"{name}|{agent_id}")
        return name
    raise RuntimeError("poolq: could not allocate an agent name")


def remember(client: redis.Redis, node: str, names: Iterable[str]) -> None:
    """Record the names of a node's live agents (called every heartbeat of the node)."""
    current = list(names)
    if not current:
        return
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.node_names(node))
    pipe.sadd(keys.node_names(node), *current)
    pipe.execute()


def remembered(client: redis.Redis, node: str) -> list[str]:
    """The names a node's agents had at its last heartbeat, sorted."""
    return sorted(str(name) for name in client.smembers(keys.node_names(node)))


def checkin(client: redis.Redis, name: str, host: str, pid: int, slot: str = "") -> None:
    """Give ``name`` back to the pool when its agent stops."""
    pipe = client.pipeline(transaction=False)
    pipe.hdel(BY_PROCESS, process_key(host, pid, slot))
    pipe.sadd(FREE, name)
    pipe.execute()


def release(client: redis.Redis, name: str) -> None:
    """Put ``name`` back in the free set (its process already holds another)."""
    client.sadd(FREE, name)


def lookup(client: redis.Redis, host: str, pid: int, slot: str = "") -> str | None:
    """The name of the agent running in (host, pid), if it has one."""
    entry = client.hget(BY_PROCESS, process_key(host, pid, slot))
    return None if entry is None else str(entry).partition("|")[0]


def _refill(client: redis.Redis) -> None:
    if _reclaim(client):
        return
    taken = client.scard(ALL)
    if taken >= len(_ADJECTIVES) * len(_NOUNS):
        # Every plain name is in use: number them.
        candidates = [f"{random.choice(_ADJECTIVES)}-{random.choice(_NOUNS)}-{taken + i}" for i in range(CHUNK)]
    else:
        candidates = [f"{random.choice(_ADJECTIVES)}-{random.choice(_NOUNS)}" for _ in range(CHUNK * 2)]
    client.eval(_ADD_CHUNK, 2, FREE, ALL, *candidates)


def _reclaim(client: redis.Redis) -> int:
    """Return the names of agents that died without checking in; how many."""
    dead = []
    entries = client.hgetall(BY_PROCESS)
    if not entries:
        return 0
    pipe = client.pipeline(transaction=False)
    owners = [(str(process), str(entry)) for process, entry in entries.items()]
    for _, entry in owners:
        pipe.exists(keys.agent(entry.partition("|")[2]))
    for (process, entry), alive in zip(owners, pipe.execute(), strict=True):
        if not alive:
            dead.append((process, entry.partition("|")[0]))
    for process, name in dead:
        # HDEL first: only the caller that removed the entry frees the name.
        if client.hdel(BY_PROCESS, process):
            client.sadd(FREE, name)
    return len(dead)
