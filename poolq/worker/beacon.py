"""The worker node's own registry record: starting, then ready once it consumes."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import redis

from ..config import PoolConfig
from ..store import keys, names, registry

logger = logging.getLogger("poolq.worker")


class NodeBeacon:
    """Publishes a node's record and keeps it alive; ``after_beat`` runs after each heartbeat."""

    def __init__(
        self, state: redis.Redis, pool: PoolConfig, node: str, processes: int, pool_type: str, size: int | None = None
    ) -> None:
        self.state = state
        self.pool = pool
        self.node = node
        self.after_beat: Callable[[], None] | None = None
        self.fields: dict[str, Any] = {
            "pool": pool.name,
            "state": "starting",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "size": pool.size if size is None else size,
            "max_overflow": pool.max_overflow,
            "processes": processes,
            "worker_pool": pool_type,
            "started_at": time.time(),
        }
        key = keys.node(node)
        self.heartbeat = registry.Heartbeat(
            self.state, keys=lambda: [key], republish=lambda _: self.publish(), after=self._after
        )

    def start(self) -> None:
        self.publish()
        try:
            registry.reopen(self.state, self.pool.name)
        except redis.RedisError:
            logger.warning("could not reopen pool %s", self.pool.name)
        self.heartbeat.start()

    def ready(self) -> None:
        self.fields["state"] = "ready"
        self.publish()

    def set_processes(self, processes: int) -> None:
        self.fields["processes"] = processes
        self.publish()

    def set_size(self, size: int) -> None:
        """The node's base size, as maintenance last scaled it (status counts overflow above it)."""
        self.fields["size"] = size
        self.publish()

    def publish(self) -> None:
        try:
            registry.publish_node(self.state, self.pool.name, self.node, self.fields)
        except redis.RedisError:
            logger.warning("could not publish node %s to the registry", self.node)

    def stop(self) -> None:
        self.heartbeat.stop()
        try:
            registry.remove_node(self.state, self.pool.name, self.node)
        except redis.RedisError:
            logger.warning("could not remove node %s from the registry", self.node)

    def remember_names(self) -> None:
        """Record the names of this node's live agents: a restart of the node takes them back."""
        agents = registry.snapshot(self.state, self.pool.name).agents
        names.remember(self.state, self.node, [a.name for a in agents if a.node == self.node])

    def _after(self) -> None:
        # A failure needs no word here: the heartbeat already says the registry is unreachable.
        with contextlib.suppress(redis.RedisError):
            self.remember_names()
            if self.after_beat is not None:
                self.after_beat()
