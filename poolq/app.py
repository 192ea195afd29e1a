"""The Celery app: every Celery setting poolq uses, in one place.

``celery -A poolq.app worker|beat|inspect`` finds the app here; it is built
from the configuration on first access, so importing this module reads no
file. Run Flower with ``poolq flower``: its app keeps kombu's own Redis
transport, the only one whose queue depth Flower can read (``monitor=True``).
"""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery, Task
from kombu.entity import Queue

from .config import RESTORE_INTERVAL, Config, PoolConfig, load_config

#: The queue that carries maintenance; only the maintenance worker consumes it.
CONTROL_QUEUE = "poolq.control"
#: The Celery task name of a maintenance run.
MAINTAIN_TASK = "poolq.maintain"

#: Seconds Celery waits for a new worker process beyond the pools' setup_timeout.
PROCESS_START_MARGIN = 10.0
#: The bootstep that gives a worker's processes their agents.
WORKER_STEP = "poolq.worker.step:AgentStep"
#: Socket timeouts of the broker connections: a broker that vanished without
#: closing its connections is noticed within this many seconds.
BROKER_SOCKET_TIMEOUT = 10.0
BROKER_CONNECT_TIMEOUT = 5.0


def celery_settings(config: Config, monitor: bool = False) -> dict[str, Any]:
    """The Celery configuration for ``config``.

    ``monitor``: for Flower, which sends no calls and tells brokers apart by
    their URL's scheme only: it keeps kombu's stock Redis transport, so its
    Broker tab and queue lengths work.
    """
    custom_transport = config.broker_url.startswith("redis://") and not monitor
    queues = [Queue(pool.queue, routing_key=pool.queue) for pool in config.pools.values()]
    queues.append(Queue(CONTROL_QUEUE, routing_key=CONTROL_QUEUE))
    routes = {pool.task_name: {"queue": pool.queue, "routing_key": pool.queue} for pool in config.pools.values()}
    routes[MAINTAIN_TASK] = {"queue": CONTROL_QUEUE, "routing_key": CONTROL_QUEUE}
    # Beat sends each pool's maintenance; a run beat could not deliver in time expires unrun.
    schedule = {
        f"{MAINTAIN_TASK}.{pool.name}": {
            "task": MAINTAIN_TASK,
            "schedule": pool.maintenance_interval,
            "args": (pool.name,),
            "options": {"expires": pool.maintenance_interval},
        }
        for pool in config.pools.values()
        if pool.name not in config.skip_pools
    }
    return {
        "broker_url": config.broker_url,
        # kombu's Redis transport minus a client object per message (poolq.transport).
        "broker_transport": "poolq.transport:Transport" if custom_transport else None,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": BROKER_CONNECT_TIMEOUT,
        # Workers reconnect every second, and never give up (poolq.worker.consumer).
        "broker_connection_max_retries": None,
        "worker_consumer": "poolq.worker.consumer:Consumer",
        # Redis transport: a message taken but not acknowledged goes back to
        # its queue after visibility_timeout. Live nodes renew theirs every
        # heartbeat (poolq.worker.redelivery), so only a dead node's calls
        # ever reach it; the sweep that restores them runs every 2 s.
        "broker_transport_options": {
            "visibility_timeout": config.project.redelivery_timeout,
            "unacked_restore_interval": RESTORE_INTERVAL,
            "unacked_restore_throttle": 1,
            "socket_timeout": BROKER_SOCKET_TIMEOUT,
            "socket_connect_timeout": BROKER_CONNECT_TIMEOUT,
        },
        # Replies and cast results travel through poolq's own keys
        # (poolq.store.protocol), never through a Celery result backend.
        "result_backend": None,
        "task_ignore_result": True,
        # JSON only: a pickle message is refused before any code sees it.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A call is acknowledged only once it ran; a killed process means redelivery.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_queues": queues,
        "task_routes": routes,
        "beat_schedule": schedule,
        "task_default_queue": "poolq.default",
        # poolq bounds setups itself (setup_timeout); Celery's own start-up
        # timeout (4 s) would kill slow starters: it waits past every pool's.
        "worker_proc_alive_timeout": max((p.setup_timeout for p in config.pools.values()), default=0)
        + PROCESS_START_MARGIN,
        # Flower needs task events; poolq's claims replace mingle's revoke sync.
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "worker_enable_remote_control": True,
    }


class PoolTask(Task):  # type: ignore[misc]
    """The Celery task class that carries calls to one pool's agents.

    Its strategy and request class (worker side, named by path so a client
    never imports them) look at each message before a process gets it: a
    payload nested too deep is answered with InvalidPayload, and a redelivered
    copy of a call whose first run is alive is held back (poolq.worker.guard).
    """

    typing = False  # arguments are checked against the agent's own signature
    ignore_result = True
    Strategy = "poolq.worker.guard:strategy"
    Request = "poolq.worker.guard:PoolRequest"


def _run_call(task: Task, /, *args: Any, **kwargs: Any) -> Any:
    from .worker.runtime import run_call

    return run_call(task, args, kwargs)


def _maintain(task: Task, pool: str) -> dict[str, Any]:
    from .scaling.maintenance import maintain

    config: Config = task.app.poolq_config
    decision = maintain(task.app, config, pool, _state(config.state_url))
    if decision is None:
        return {"skipped": "another run holds the lock"}
    scale = decision.scale
    return {
        "scale": None if scale is None else {"to": scale.target, "direction": scale.direction, "reason": scale.reason},
        "replace": [{"agent": r.agent_id, "reason": r.reason} for r in decision.replace],
    }


@functools.cache
def _state(url: str) -> Any:
    from .store.connection import connect

    return connect(url)


def create_app(config: Config, monitor: bool = False) -> Celery:
    """A Celery app for ``config``, with one task per pool (``monitor``: Flower's, see :func:`celery_settings`)."""
    app = Celery("poolq", set_as_current=False)
    app.conf.update(celery_settings(config, monitor=monitor))
    app.poolq_config = config
    for pool in config.pools.values():
        _register(app, pool)
    app.task(name=MAINTAIN_TASK, bind=True, shared=False, ignore_result=True)(_maintain)
    # Named, not imported: a worker loads it when it starts; a web process never does.
    app.steps["worker"].add(WORKER_STEP)
    return app


def _register(app: Celery, pool: PoolConfig) -> None:
    app.task(name=pool.task_name, base=PoolTask, bind=True, shared=False)(_run_call)


@functools.cache
def default_app() -> Celery:
    """The app built from ``POOLQ_CONFIG`` and the environment (one per process)."""
    return create_app(load_config())


def __getattr__(name: str) -> Any:
    # ``celery -A poolq.app`` looks up ``poolq.app:app``; build it on demand.
    if name in ("app", "celery"):
        return default_app()
    raise AttributeError(name)
