"""How many calls wait in a pool's queue (the broker's view)."""

from __future__ import annotations

from urllib.parse import urlparse

import amqp.exceptions
from celery import Celery

from ..config import Config, PoolConfig


def same_redis(broker_url: str, state_url: str) -> bool:
    """Whether the broker and the state store are the same Redis database."""
    broker, state = urlparse(broker_url), urlparse(state_url)
    if broker.scheme not in ("redis", "rediss", "unix") or state.scheme not in ("redis", "rediss", "unix"):
        return False
    return (broker.hostname, broker.port, _db(broker.path), broker.scheme) == (
        state.hostname,
        state.port,
        _db(state.path),
        state.scheme,
    )


def depth(app: Celery, config: Config, pool: PoolConfig) -> int:
    """Messages waiting in ``pool``'s queue (not yet delivered to a worker)."""
    with app.pool.acquire(block=True) as connection:
        channel = connection.default_channel
        if config.broker_url.startswith(("redis://", "rediss://", "unix://")):
            # The Redis transport keeps a queue as a list of the same name.
            return int(channel.client.llen(pool.queue))
        try:
            return int(channel.queue_declare(pool.queue, passive=True).message_count)
        except amqp.exceptions.NotFound:
            return 0


def _db(path: str) -> int:
    name = path.strip("/")
    return int(name) if name.isdigit() else 0
