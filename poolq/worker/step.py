"""How poolq hooks into a Celery worker: one bootstep and two signals.

Celery starts agents differently per execution pool, so poolq covers each:

- prefork: each child builds its agent in ``worker_process_init``. Celery sends
  the child's "up" message only after that signal returns, and writes jobs
  only to children that are up, so a child takes no work until its agent is
  warm. Celery kills a child that is not up within
  ``worker_proc_alive_timeout`` (4 s by default): the bootstep raises it to
  the pool's ``setup_timeout``. Teardown runs in ``worker_process_shutdown``.
  Nothing is built in the parent, before the fork.
- solo: Celery sends ``worker_process_init`` in the worker process itself,
  while it builds the pool; teardown runs when the bootstep stops.
- threads: Celery sends neither signal, so the bootstep builds one agent per
  thread before the consumer starts, and tears them down when it stops.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import redis
from celery import Celery, bootsteps
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready
from celery.worker.control import control_command

from .. import protocol, queues, registry
from ..app import CONTROL_QUEUE, MAINTAIN_TASK, PROCESS_START_MARGIN
from ..config import Config, PoolConfig
from ..errors import ConfigError
from . import runtime
from .host import load_agent_class
from .scaler import TICK, NodeScaler

logger = logging.getLogger("poolq.worker")

SUPPORTED_POOLS = ("prefork", "threads", "solo")

# Set in the worker's main process, before any fork: which pool this node serves.
_serving: tuple[Config, PoolConfig, str] | None = None


def serving_pool(config: Config, queues: list[str]) -> PoolConfig | None:
    """The pool whose queue a worker consumes, or None if it consumes none.

    Raises:
        ConfigError: the worker consumes the queues of several pools.
    """
    pools = [pool for pool in config.pools.values() if pool.queue in queues]
    if len(pools) > 1:
        names = ", ".join(pool.name for pool in pools)
        raise ConfigError(f"a worker serves one pool, but this one consumes the queues of {names}")
    return pools[0] if pools else None


class AgentStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep that gives each execution slot a warm agent."""

    requires = ("celery.worker.components:Pool",)
    label = "poolq agents"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        global _serving
        super().__init__(worker, **kwargs)
        config: Config = worker.app.poolq_config
        pool = serving_pool(config, list(worker.app.amqp.queues.consume_from or {}))
        self.pool = pool
        if pool is None:
            return
        pool_type = _pool_type(worker.pool_cls)
        if pool_type not in SUPPORTED_POOLS:
            raise ConfigError(
                f"pool {pool.name!r}: poolq supports the {', '.join(SUPPORTED_POOLS)} execution pools, "
                f"not {pool_type!r}"
            )
        # Fail here, in the main process, on an agent that cannot be imported,
        # instead of in every child (which Celery would respawn forever).
        load_agent_class(pool)
        worker.app.conf.worker_proc_alive_timeout = pool.setup_timeout + PROCESS_START_MARGIN
        self.pool_type = pool_type
        _serving = (config, pool, worker.hostname)

    def start(self, worker: Any) -> None:
        if self.pool is None:
            return
        assert _serving is not None
        config, pool, node = _serving
        self.beacon = NodeBeacon(config, pool, node, processes=worker.concurrency, pool_type=self.pool_type)
        self.beacon.start()
        if self.pool_type == "threads":
            runtime.install(runtime.Runtime.create(config, pool, node, slots=worker.concurrency))
        if self.pool_type == "prefork":
            global _scaler
            app = worker.app
            _scaler = NodeScaler(
                worker,
                pool,
                node,
                self.beacon.state,
                base=worker.concurrency,
                waiting=lambda: queues.depth(app, config, pool),
                on_change=self.beacon.set_processes,
                request_maintenance=lambda: app.send_task(
                    MAINTAIN_TASK, args=(pool.name,), queue=CONTROL_QUEUE, routing_key=CONTROL_QUEUE,
                    expires=pool.maintenance_interval,
                ),
            )  # fmt: skip
            worker.timer.call_repeatedly(TICK, _scaler.tick)

    def stop(self, worker: Any) -> None:
        if self.pool is None:
            return
        if self.pool_type in ("threads", "solo"):
            runtime.uninstall()
        self.beacon.stop()

    def info(self, worker: Any) -> dict[str, Any]:
        """This node's agents, for `celery inspect stats` and Flower's worker page ("Other")."""
        if self.pool is None:
            return {}
        try:
            records = registry.snapshot(self.beacon.state, self.pool.name).agents
        except redis.RedisError:
            return {}
        agents = {
            r.get("name", r["id"]): {
                "pid": int(r.get("pid", 0)),
                "state": r.get("state"),
                "requests": r.get("requests"),
            }
            for r in records
            if r.get("node") == worker.hostname
        }
        return {"poolq": {"pool": self.pool.name, "agents": agents}}


class NodeBeacon:
    """The worker node's own registry record: starting, then ready once it consumes."""

    def __init__(self, config: Config, pool: PoolConfig, node: str, processes: int, pool_type: str) -> None:
        self.state = protocol.connect(config.state_url)
        self.pool = pool
        self.node = node
        self.fields: dict[str, Any] = {
            "pool": pool.name,
            "state": "starting",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "size": pool.size,
            "max_overflow": pool.max_overflow,
            "processes": processes,
            "worker_pool": pool_type,
            "started_at": time.time(),
        }
        key = registry.node_key(node)
        self.heartbeat = registry.Heartbeat(self.state, keys=lambda: [key], republish=lambda _: self.publish())

    def start(self) -> None:
        global _beacon
        _beacon = self
        self.publish()
        self.heartbeat.start()

    def ready(self) -> None:
        self.fields["state"] = "ready"
        self.publish()

    def set_processes(self, processes: int) -> None:
        self.fields["processes"] = processes
        self.publish()

    def publish(self) -> None:
        try:
            registry.publish_node(self.state, self.pool.name, self.node, self.fields)
        except redis.RedisError:
            logger.warning("could not publish node %s to the registry", self.node, exc_info=True)

    def stop(self) -> None:
        self.heartbeat.stop()
        try:
            registry.remove_node(self.state, self.pool.name, self.node)
        except redis.RedisError:
            logger.warning("could not remove node %s from the registry", self.node)


_beacon: NodeBeacon | None = None
_scaler: NodeScaler | None = None


@control_command(args=[("pool", str)], signature="<pool>")
def poolq_sync(state: Any, pool: str = "", **_: Any) -> dict[str, str]:
    """Remote control: re-read the pool's base size and replace marks now (sent by maintenance)."""
    if _scaler is None or (pool and _scaler.pool.name != pool):
        return {"ok": "nothing to sync here"}
    # Remote control runs in the event loop, like the scaler's timer: act now.
    _scaler.next_sync = 0.0
    _scaler.tick()
    return {"ok": f"{_scaler.pool.name} synced"}


@worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    if _beacon is not None:
        _beacon.ready()


def _pool_type(pool_cls: Any) -> str:
    module = pool_cls if isinstance(pool_cls, str) else getattr(pool_cls, "__module__", "")
    for name in ("prefork", "thread", "solo", "eventlet", "gevent", "processes"):
        if name in module:
            return {"thread": "threads", "processes": "prefork"}.get(name, name)
    return str(module)


@worker_process_init.connect
def _on_process_init(sender: Any = None, **_: Any) -> None:
    if _serving is not None:
        config, pool, node = _serving
        runtime.install(runtime.Runtime.create(config, pool, node, slots=1))


@worker_process_shutdown.connect
def _on_process_shutdown(**_: Any) -> None:
    runtime.uninstall()


def install_worker_step(app: Celery) -> None:
    """Add the poolq bootstep to ``app``'s workers."""
    app.steps["worker"].add(AgentStep)
