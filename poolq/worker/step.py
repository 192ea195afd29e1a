"""How poolq hooks into a Celery worker: one bootstep, a task strategy and two signals.

Celery starts agents differently per execution pool, so poolq covers each:

- prefork: each child builds its agent in ``worker_process_init``. Celery sends
  the child's "up" message only after that signal returns, and writes jobs
  only to children that are up, so a child takes no work until its agent is
  warm. poolq bounds the setup itself (``setup_timeout``, see
  :mod:`poolq.worker.limits`) and raises Celery's ``worker_proc_alive_timeout``
  (4 s by default, which would kill slow starters) above it. Teardown runs in
  ``worker_process_shutdown``. Nothing is built in the parent, before the fork.
  Just before each fork (``worker_before_create_process``) the parent picks
  the new process's placement index, which says which GPUs its agent gets
  (:mod:`poolq.worker.placement`).
- solo: Celery sends ``worker_process_init`` in the worker process itself,
  while it builds the pool; teardown runs when the bootstep stops.
- threads: Celery sends neither signal, so the bootstep builds one agent per
  thread before the consumer starts, and tears them down when it stops.

Everything poolq keeps for a node lives in one :class:`Node`, made in the
node's main process before it forks (so prefork children inherit it).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import bootsteps
from celery.signals import worker_before_create_process, worker_process_init, worker_process_shutdown, worker_ready
from celery.worker import control as celery_control
from celery.worker.control import control_command

from .. import events
from ..agent import BatchSpec, load_agent_class
from ..app import CONTROL_QUEUE, MAINTAIN_TASK
from ..config import Config, PoolConfig
from ..errors import ConfigError
from ..store import connection, queues, registry
from . import batching, placement, runtime, scaler
from .beacon import NodeBeacon
from .redelivery import Renewal, uses_visibility
from .scaler import TICK, NodeScaler, RetireRequests

logger = logging.getLogger("poolq.worker")

SUPPORTED_POOLS = ("prefork", "threads", "solo")


@dataclass
class Node:
    """poolq's side of one worker node."""

    config: Config
    pool: PoolConfig
    name: str
    pool_type: str
    state: redis.Redis
    hostname: str = ""
    retire_requests: RetireRequests | None = None
    beacon: NodeBeacon | None = None
    scaler: NodeScaler | None = None
    renewal: Renewal | None = None
    #: A prefork node's placement indexes (which GPUs each of its processes gets).
    placements: placement.PlacementBook | None = None
    #: The agents' ``@batched`` operations, by name (empty: no batching on this node).
    batched: dict[str, BatchSpec] = field(default_factory=dict)


_node: Node | None = None


def current_node() -> Node | None:
    """This process's node (inherited by prefork children), if it serves a pool."""
    return _node


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
        global _node
        super().__init__(worker, **kwargs)
        config: Config = worker.app.poolq_config
        # Before the fork: every process of the worker hears its events.
        events.load(config.project.observers)
        pool = serving_pool(config, list(worker.app.amqp.queues.consume_from or {}))
        self.node: Node | None = None
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
        agent_class = load_agent_class(pool)
        # Batched operations: the node takes enough calls from the queue to fill their batches.
        worker.prefetch_multiplier = batching.prefetch_multiplier(agent_class, int(worker.prefetch_multiplier))
        # Reads the GPUs (never CUDA) once, before the fork: the children inherit what it found.
        unplaced = placement.check(pool)
        if unplaced:
            logger.error("%s: its agents' setups will fail", unplaced)
        self.node = _node = Node(
            config=config,
            pool=pool,
            name=worker.hostname,
            pool_type=pool_type,
            state=connection.connect(config.state_url),
            hostname=socket.gethostname(),
            retire_requests=RetireRequests() if pool_type == "prefork" else None,
            placements=placement.PlacementBook() if pool_type == "prefork" else None,
            batched=agent_class.batched_operations(),
        )

    def start(self, worker: Any) -> None:
        node = self.node
        if node is None:
            return
        config, pool = node.config, node.pool
        node.beacon = NodeBeacon(
            node.state,
            pool,
            node.name,
            processes=worker.concurrency,
            pool_type=node.pool_type,
            # A prefork node starts at the size maintenance last scaled the pool to.
            size=worker.concurrency if node.pool_type == "prefork" else pool.size,
        )
        if uses_visibility(config.broker_url):
            node.renewal = Renewal(
                redis.Redis.from_url(config.broker_url, socket_timeout=connection.SOCKET_TIMEOUT),
                tags=lambda: _held_tags(worker),
            )
            node.beacon.after_beat = node.renewal.beat
        node.beacon.start()
        if node.pool_type == "threads":
            runtime.install(runtime.Runtime.create(config, pool, node.name, slots=worker.concurrency))
        if node.pool_type == "prefork":
            app = worker.app
            node.scaler = NodeScaler(
                worker,
                pool,
                node.name,
                node.state,
                base=worker.concurrency,
                waiting=lambda: queues.depth(app, config, pool),
                on_change=node.beacon.set_processes,
                on_base=node.beacon.set_size,
                request_maintenance=lambda: app.send_task(
                    MAINTAIN_TASK, args=(pool.name,), queue=CONTROL_QUEUE, routing_key=CONTROL_QUEUE,
                    expires=pool.maintenance_interval,
                ),
                retire_requests=node.retire_requests,
            )  # fmt: skip
            worker.timer.call_repeatedly(TICK, node.scaler.tick)

    def stop(self, worker: Any) -> None:
        node = self.node
        if node is None:
            return
        if node.pool_type in ("threads", "solo"):
            runtime.uninstall()
        if node.beacon is not None:
            node.beacon.stop()

    def info(self, worker: Any) -> dict[str, Any]:
        """This node's agents, for `celery inspect stats` and Flower's worker page ("Other")."""
        node = self.node
        if node is None:
            return {}
        try:
            records = registry.snapshot(node.state, node.pool.name).agents
        except redis.RedisError:
            return {}
        agents = {
            r.name: {"pid": r.pid, "state": r.state, "requests": r.requests}
            for r in records
            if r.node == worker.hostname
        }
        return {"poolq": {"pool": node.pool.name, "agents": agents}}


def _held_tags(worker: Any) -> list[str]:
    """The delivery tags of the messages this node holds (taken, not yet acknowledged)."""
    consumer = getattr(worker, "consumer", None)
    task_consumer = getattr(consumer, "task_consumer", None)
    channel = getattr(task_consumer, "channel", None)
    delivered = getattr(getattr(channel, "qos", None), "_delivered", None)
    if not delivered:
        return []
    for _ in range(3):  # read from the heartbeat thread while the event loop may change it
        try:
            return [str(tag) for tag in list(delivered)]
        except RuntimeError:
            continue
    return []


@control_command(args=[("pool", str)], signature="<pool>")
def poolq_sync(state: Any, pool: str = "", **_: Any) -> dict[str, str]:
    """Remote control: re-read the pool's base size and replace marks now (sent by maintenance)."""
    scaler = _node.scaler if _node is not None else None
    if scaler is None or (pool and scaler.pool.name != pool):
        return {"ok": "nothing to sync here"}
    # Remote control runs in the event loop, like the scaler's timer: act now.
    scaler.next_sync = 0.0
    scaler.tick()
    return {"ok": f"{scaler.pool.name} synced"}


@control_command(args=[("pool", str)], signature="<pool>")
def poolq_drain(state: Any, pool: str = "", **_: Any) -> dict[str, Any]:
    """Remote control: retire this node's idle agents above its base size now (``poolq drain``)."""
    scaler = _node.scaler if _node is not None else None
    if scaler is None or (pool and scaler.pool.name != pool):
        return {"retired": 0}
    return {"retired": scaler.drain_idle()}


@control_command(args=[("n", int)], signature="[N=1]")
def pool_grow(state: Any, n: int = 1, **kwargs: Any) -> dict[str, str]:
    """Grow pool by n processes (a poolq node: up to its base size + max_overflow)."""
    scaler = _node.scaler if _node is not None else None
    if scaler is None:
        return celery_control.pool_grow(state, n=n, **kwargs)  # type: ignore[no-any-return]
    return scaler.resize_by_request(+n)


@control_command(args=[("n", int)], signature="[N=1]")
def pool_shrink(state: Any, n: int = 1, **kwargs: Any) -> dict[str, str]:
    """Shrink pool by n processes (a poolq node: not below its base size)."""
    scaler = _node.scaler if _node is not None else None
    if scaler is None:
        return celery_control.pool_shrink(state, n=n, **kwargs)  # type: ignore[no-any-return]
    return scaler.resize_by_request(-n)


@worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    if _node is not None and _node.beacon is not None:
        _node.beacon.ready()


def _pool_type(pool_cls: Any) -> str:
    module = pool_cls if isinstance(pool_cls, str) else getattr(pool_cls, "__module__", "")
    for name in ("prefork", "thread", "solo", "eventlet", "gevent", "processes"):
        if name in module:
            return {"thread": "threads", "processes": "prefork"}.get(name, name)
    return str(module)


@worker_before_create_process.connect
def _on_before_fork(sender: Any = None, **_: Any) -> None:
    # In the node's main process, just before billiard forks a process: pick its
    # placement index (the child reads placement.NEXT_INDEX). While the scaler
    # grows a warm replacement (NEXT_SLOT is set), the new process takes over
    # the index, and so the GPUs, of the process it replaces.
    node = _node
    if node is None or node.placements is None or sender is None:
        return
    job = node.scaler.plan.replacing if node.scaler is not None and scaler.NEXT_SLOT is not None else None
    live = [p.pid for p in list(sender._pool) if p.pid and p.exitcode is None]
    placement.NEXT_INDEX = node.placements.before_fork(live, replaces=job.pid if job is not None else None)


@worker_process_init.connect
def _on_process_init(sender: Any = None, **_: Any) -> None:
    node = _node
    if node is not None:
        requests = node.retire_requests
        rt = runtime.Runtime.create(
            node.config,
            node.pool,
            node.name,
            slots=1,
            retire=requests.ask if requests is not None else None,
            slot=scaler.NEXT_SLOT,  # set by the node when this process replaces another
        )
        runtime.install(rt)


@worker_process_shutdown.connect
def _on_process_shutdown(**_: Any) -> None:
    runtime.uninstall()
