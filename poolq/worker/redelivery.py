"""Keeping a node's calls to itself while it lives, and handing them on soon after it dies.

With the Redis broker, kombu keeps each message a worker took but has not yet
acknowledged in ``unacked`` (the message) and ``unacked_index`` (the time it
was taken), and a sweep in every worker puts back in its queue any message
older than ``visibility_timeout``. That bound is a guess about how long a call
may run: a longer call is handed to a second worker while the first still
runs it, and a call whose node died waits for the whole timeout.

poolq removes the guess. Each live node, every heartbeat:

- renews the time of every message it holds (``ZADD XX``), so a live node's
  calls are never handed on, however long they run;
- records which messages it holds next to its node record in the state Redis.

And one node at a time sweeps for nodes whose heartbeat lapsed (their record
expired: the proof of death): their messages are marked as taken at time 0,
so kombu's next sweep (every ``RESTORE_INTERVAL`` seconds) puts them back at
once. A node that dies is thus noticed within the heartbeat TTL, not the
visibility timeout, which stays the backstop.

RabbitMQ needs none of this: it hands a dead consumer's messages on when its
connection closes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable

import redis

from .. import registry

logger = logging.getLogger("poolq.worker")

#: Hash in the state Redis: node -> JSON list of the delivery tags it holds.
HELD_KEY = "poolq:held"
#: Lock that lets one node at a time sweep for dead nodes.
SWEEP_LOCK = "poolq:held:sweep"
#: Seconds between two sweeps for dead nodes (across all nodes).
SWEEP_INTERVAL = 2.0


def uses_visibility(broker_url: str) -> bool:
    """Whether the broker redelivers by visibility timeout (the Redis transport)."""
    return broker_url.startswith(("redis://", "rediss://", "unix://"))


class Renewal:
    """A node's share of keeping calls delivered exactly where they belong (see the module doc).

    ``tags`` returns the delivery tags the node holds now (read from the
    consumer's channel by the caller).
    """

    def __init__(
        self,
        broker: redis.Redis,
        state: redis.Redis,
        node: str,
        tags: Callable[[], Iterable[str]],
        unacked_index_key: str = "unacked_index",
    ) -> None:
        self.broker = broker
        self.state = state
        self.node = node
        self.tags = tags
        self.unacked_index_key = unacked_index_key

    def beat(self) -> None:
        """Renew this node's messages and record them; sweep for dead nodes when it is this node's turn."""
        tags = sorted(set(self.tags()))
        if tags:
            now = time.time()
            self.broker.zadd(self.unacked_index_key, dict.fromkeys(tags, now), xx=True)
            self.state.hset(HELD_KEY, self.node, json.dumps(tags))
        else:
            self.state.hdel(HELD_KEY, self.node)
        if self.state.set(SWEEP_LOCK, self.node, nx=True, px=int(SWEEP_INTERVAL * 1000)):
            self.sweep()

    def sweep(self) -> list[str]:
        """Hand back the messages of nodes whose heartbeat lapsed; their names."""
        held = {str(node): str(tags) for node, tags in self.state.hgetall(HELD_KEY).items()}
        others = [node for node in held if node != self.node]
        if not others:
            return []
        pipe = self.state.pipeline(transaction=False)
        for node in others:
            pipe.exists(registry.node_key(node))
        dead = [node for node, alive in zip(others, pipe.execute(), strict=True) if not alive]
        for node in dead:
            tags = json.loads(held[node])
            if tags:
                # Taken "at time 0": kombu's own sweep restores them at its next pass.
                self.broker.zadd(self.unacked_index_key, dict.fromkeys(tags, 0), xx=True)
            self.state.hdel(HELD_KEY, node)
            logger.warning("node %s died holding %d call(s); handing them back to their queue", node, len(tags))
        return dead

    def stop(self) -> None:
        """Forget this node's record (it stops: kombu restores what it still holds)."""
        try:
            self.state.hdel(HELD_KEY, self.node)
        except redis.RedisError:
            logger.warning("could not remove node %s's held calls record", self.node)
