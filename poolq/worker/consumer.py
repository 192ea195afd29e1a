"""Celery's consumer, reconnecting to a broker that came back within a couple of seconds.

Celery's consumer tries to reconnect after 2, 4, 6 ... up to 30 s: a node may
stay away for tens of seconds after a broker restart, its agents warm and
idle while calls queue. A poolq node tries every :data:`RECONNECT_INTERVAL`
seconds, and forever (``broker_connection_max_retries = None``): giving up
would throw away warm agents for nothing.
"""

from __future__ import annotations

import functools
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

#: Seconds between a node's attempts to reach a broker that is away (the first after half of it).
RECONNECT_INTERVAL = 1.0


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """The ``worker_consumer`` of poolq's workers."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            type(conn).ensure_connection,
            conn,
            interval_start=RECONNECT_INTERVAL / 2,
            interval_step=RECONNECT_INTERVAL / 2,
            interval_max=RECONNECT_INTERVAL,
        )
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection
