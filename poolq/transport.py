"""kombu's Redis transport, without a new Redis client object per command.

kombu's Redis channel builds a fresh ``redis.Redis`` object for every publish
and every acknowledgement (``Channel.conn_or_acquire``). The connections come
from a pool, but with redis-py 8 each client object also builds its
case-insensitive table of response callbacks (about 170 entries): a sixth of a
millisecond per message, on the client's publish and on the worker's
acknowledgement. This channel builds that client once per channel and reuses
it; redis-py clients are thread-safe, and pipelines and pub/sub objects are
still made per use. Messages, queues and acknowledgements are unchanged.

poolq uses it for ``redis://`` brokers (``broker_transport`` in
:func:`poolq.app.celery_settings`).
"""

from __future__ import annotations

import functools
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """A kombu Redis channel that reuses its synchronous client."""

    @functools.cached_property
    def _sync_client(self) -> Any:
        return super()._create_client(asynchronous=False)  # type: ignore[no-untyped-call]

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        return self._sync_client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
