"""Keeping a node's calls to itself while it lives, and handing them on soon after it dies.

With the Redis broker, kombu keeps each message a worker took but has not yet
acknowledged in ``unacked`` (the message) and ``unacked_index`` (the time it
was taken), and a sweep in every worker (every ``RESTORE_INTERVAL`` seconds)
puts back in its queue any message older than ``visibility_timeout``. Left at
that, the timeout is a guess about how long a call may run: a longer call is
handed to a second worker while the first still runs it, and a call whose
node died waits for the whole timeout.

poolq removes the guess: every heartbeat, a live node renews the time of each
message it holds (``ZADD XX``). A live node's calls are thus never handed on,
however long they run, and the visibility timeout becomes the lifetime of a
node's heartbeat on its calls: ``redelivery_timeout`` (10 s by default) after
a node dies, its calls are back in their queue for another node (or for it,
when it comes back). The claims (:mod:`poolq.store.protocol`) keep a copy handed
out while its first run lives (a node stalled that long) from running twice.

RabbitMQ needs none of this: it hands a dead consumer's messages on as soon
as its connection closes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import redis

logger = logging.getLogger("poolq.worker")


def uses_visibility(broker_url: str) -> bool:
    """Whether the broker redelivers by visibility timeout (the Redis transport)."""
    return broker_url.startswith(("redis://", "rediss://", "unix://"))


class Renewal:
    """Renews the messages a node holds; ``tags`` returns their delivery tags (read by the caller)."""

    def __init__(
        self, broker: redis.Redis, tags: Callable[[], Iterable[str]], unacked_index_key: str = "unacked_index"
    ) -> None:
        self.broker = broker
        self.tags = tags
        self.unacked_index_key = unacked_index_key

    def beat(self) -> None:
        """Mark every message this node holds as taken now (only those still unacknowledged)."""
        tags = set(self.tags())
        if tags:
            self.broker.zadd(self.unacked_index_key, dict.fromkeys(tags, time.time()), xx=True)
