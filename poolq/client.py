"""The client: ``call`` (send and wait) and ``cast`` (send, resolve later).

The call path, top to bottom::

    call(pool, *args, **kwargs)
      -> check pool, payload                         (typed errors, nothing sent)
      -> Celery send_task to queue poolq.<pool>      (expires = now + timeout)
      -> BLPOP poolq:reply:<id>, up to timeout
         -> nothing yet: try to claim the call as expired
            -> won: CheckoutTimeout (the call will never run)
            -> an agent has it: BLPOP up to call_timeout + grace, else CallTimeout
      -> decode the reply: the result, or the typed error it carries
"""

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import celery.exceptions
import kombu.exceptions
import redis
from celery import Celery
from celery.result import AsyncResult

from . import protocol, queues, registry
from .app import create_app, default_app
from .config import Config, PoolConfig, load_config
from .errors import (
    AgentError,
    BrokerUnavailable,
    CallTimeout,
    CheckoutTimeout,
    InvalidPayload,
    PoolDegraded,
    PoolExhausted,
    PoolqError,
    PoolqTimeout,
    ResultTimeout,
)
from .lease import Lease
from .queues import same_redis
from .status import PoolStatus, read_status

#: Seconds a client trusts what it last read of a pool's circuit breaker.
BREAKER_CACHE = 1.0


class Client:
    """A connection to one poolq deployment (its config, broker and state Redis).

    Most code uses the module functions :func:`call` and :func:`cast`, which
    share one client built from the environment; build a ``Client`` yourself
    to talk to another deployment.
    """

    def __init__(self, config: Config | None = None, app: Celery | None = None) -> None:
        self.config = config or load_config()
        self._app = app
        self._breakers: dict[str, tuple[float, str | None]] = {}

    @functools.cached_property
    def app(self) -> Celery:
        """The Celery app that sends this client's calls."""
        return self._app or create_app(self.config)

    @functools.cached_property
    def state(self) -> redis.Redis:
        """The state Redis (replies, claims, registry)."""
        return protocol.connect(self.config.state_url)

    @functools.cached_property
    def scripts(self) -> protocol.Scripts:
        return protocol.Scripts(self.state)

    def close(self) -> None:
        """Close this client's connections (it reconnects if used again)."""
        if "scripts" in self.__dict__:
            self.scripts.close()
        if "state" in self.__dict__:
            self.state.close()
        if "app" in self.__dict__ and self._app is None:
            self.app.close()  # its broker connections and producer pool

    def call(
        self,
        pool: str,
        *args: Any,
        op: str | None = None,
        timeout: float | None = None,
        call_timeout: float | None = None,
        block: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Run ``op`` (default ``handle``) on an agent of ``pool`` and return its result.

        Parameters:
            pool: a configured pool name.
            args, kwargs: the operation's arguments (plain JSON).
            op: the agent operation; ``None`` runs ``handle``.
            timeout: seconds to wait for a free agent (default: the pool's).
                A call not started by then never runs.
            call_timeout: seconds the agent may spend on it (default: the pool's).
            block: ``False`` fails at once with ``PoolExhausted`` when no agent
                is free and overflow is spent, instead of waiting in the queue.

        Raises:
            UnknownPool, InvalidPayload, PoolExhausted: before anything is sent.
            CheckoutTimeout: no agent took the call within ``timeout``.
            CallTimeout: the agent did not finish within ``call_timeout``.
            AgentError: the agent raised; ``remote_type``, ``message`` and
                ``remote_traceback`` describe it.
            UnknownOperation, InvalidArguments, AgentUnavailable, AgentCrashed.
        """
        config, timeout, call_timeout = self.admit(pool, args, kwargs, timeout, call_timeout)
        self.check_capacity(config, block)
        task_id = str(uuid.uuid4())
        reply_to = protocol.reply_key(task_id)
        self.send(config, args, kwargs, op, timeout, call_timeout, reply_to=reply_to, task_id=task_id)
        with self.translate_errors():
            reply = self.scripts.pop(reply_to, timeout)
            if reply is None:
                if self.give_up(task_id):
                    raise CheckoutTimeout(
                        f"no agent of pool {pool!r} took the call within {timeout:g}s; it will not run"
                    )
                reply = self.scripts.pop(reply_to, call_timeout + protocol.CALL_GRACE)
        if reply is None:
            raise CallTimeout(f"the agent of pool {pool!r} did not finish the call within {call_timeout:g}s")
        return protocol.decode_reply(reply)

    def cast(
        self,
        pool: str,
        *args: Any,
        op: str | None = None,
        timeout: float | None = None,
        call_timeout: float | None = None,
        block: bool = True,
        **kwargs: Any,
    ) -> Handle:
        """Send a call and return at once with a :class:`Handle` on its result.

        ``timeout`` (default: none) is how long the call may wait in the queue;
        the other parameters and errors are those of :meth:`call`.
        """
        config = self.config.pool(pool)
        if timeout is not None:
            check_seconds("timeout", timeout)
        call_timeout = config.call_timeout if call_timeout is None else check_seconds("call_timeout", call_timeout)
        self.check_payload(config, args, kwargs)
        self.check_breaker(config)
        self.check_capacity(config, block)
        return Handle(self.send(config, args, kwargs, op, timeout, call_timeout, reply_to=None), client=self)

    def lease(self, pool: str, timeout: float | None = None, ttl: float | None = None, block: bool = True) -> Lease:
        """Hold one agent of ``pool`` for several calls (see :class:`~poolq.lease.Lease`).

        Parameters:
            timeout: seconds to wait for an agent (default: the pool's).
            ttl: seconds the lease may go without a call before its agent is
                taken back (the client is presumed dead).
            block: ``False`` fails at once with ``PoolExhausted`` when no agent is free.
        """
        return Lease(self, pool, timeout=timeout, ttl=ttl, block=block)

    def map(self, pool: str, items: Iterable[Any], **options: Any) -> list[Any]:
        """Call ``pool`` once per item, at most ``concurrency`` at a time; results in input order.

        The options are those of :meth:`poolq.aio.AsyncClient.map`.
        """
        from .aio import run_sync

        return list(run_sync(lambda aclient: aclient.map(pool, items, **options), self))

    def drain(self, pool: str, timeout: float | None = None) -> PoolStatus:
        """Wait until nothing waits in the pool's queue and no agent is busy or leased (quiescence).

        Raises:
            PoolqTimeout: not quiet within ``timeout`` seconds.
        """
        from .aio import run_sync

        status: PoolStatus = run_sync(lambda aclient: aclient.drain(pool, timeout=timeout), self)
        return status

    def stop_nodes(self, pool: str, timeout: float = 300.0) -> list[str]:
        """Stop every worker node of ``pool`` gracefully (Celery's warm shutdown); their names.

        In-flight calls finish; calls still queued, or prefetched but not
        started, stay in the queue for other or later nodes; agents are torn
        down. Waits until the nodes have left the registry.

        Raises:
            PoolqTimeout: a node is still running after ``timeout`` seconds.
        """
        nodes = [node.id for node in self.status(pool).nodes]
        if not nodes:
            return []
        with self.translate_errors():
            self.app.control.shutdown(destination=nodes)
        deadline = time.monotonic() + timeout

        def running() -> bool:
            now = self.status(pool)
            # The node leaves the registry when it stops consuming, its agents
            # when their in-flight call is done and they are torn down.
            return any(n.id in nodes for n in now.nodes) or any(a.node in nodes for a in now.agents)

        while running():
            if time.monotonic() > deadline:
                raise PoolqTimeout(f"nodes of pool {pool!r} still running after {timeout:g}s")
            time.sleep(0.2)
        return nodes

    def status(self, pool: str) -> PoolStatus:
        """The pool's state, counters and agents across its worker nodes.

        One round trip when the broker is the state Redis.

        Raises:
            UnknownPool, BrokerUnavailable.
        """
        config = self.config.pool(pool)
        with self.translate_errors():
            waiting = None
            if not self._queue_in_state:
                waiting = queues.depth(self.app, self.config, config)
            return read_status(self.state, config, waiting=waiting)

    def handle(self, task_id: str) -> Handle:
        """A handle on an earlier cast, known by its id (from any process)."""
        return Handle(task_id, client=self)

    # -- the parts calls, casts and leases share ---------------------------

    def admit(
        self,
        pool: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        call_timeout: float | None,
    ) -> tuple[PoolConfig, float, float]:
        """Check a call at the boundary, before anything is sent: its pool, timeouts (the pool's by default).

        Raises:
            UnknownPool, ValueError (a timeout not positive), InvalidPayload, PoolDegraded
        """
        config = self.config.pool(pool)
        timeout = config.timeout if timeout is None else check_seconds("timeout", timeout)
        call_timeout = config.call_timeout if call_timeout is None else check_seconds("call_timeout", call_timeout)
        self.check_payload(config, args, kwargs)
        self.check_breaker(config)  # a Redis read at most once a second
        return config, timeout, call_timeout

    def check_payload(self, pool: PoolConfig, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Refuse arguments that are not plain JSON or exceed the pool's limit.

        Raises:
            InvalidPayload
        """
        try:
            body = json.dumps([args, kwargs], allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InvalidPayload(f"arguments for pool {pool.name!r} are not plain JSON: {exc}") from None
        size = len(body.encode())
        if size > pool.max_payload_bytes:
            raise InvalidPayload(
                f"arguments for pool {pool.name!r} are {size} bytes, over the limit of {pool.max_payload_bytes} "
                "(max_payload_bytes)"
            )

    def check_breaker(self, pool: PoolConfig) -> None:
        """Fail fast while the pool's circuit breaker is open (its setups keep failing).

        Reads the breaker at most once per :data:`BREAKER_CACHE` seconds, so
        it costs the call path a round trip once a second, not per call.

        Raises:
            PoolDegraded
        """
        now = time.monotonic()
        checked_at, error = self._breakers.get(pool.name, (-math.inf, None))
        if now - checked_at >= BREAKER_CACHE:
            with self.translate_errors():
                stats = {str(k): str(v) for k, v in self.state.hgetall(registry.stats_key(pool.name)).items()}
            error = str(stats.get("breaker_error", "")) if registry.breaker_open(stats, time.time()) else None
            self._breakers[pool.name] = (now, error)
        if error is not None:
            raise PoolDegraded(f"pool {pool.name!r} is degraded, its agents fail to set up: {error}")

    def check_capacity(self, pool: PoolConfig, block: bool) -> None:
        """Fail fast, without sending, when the pool cannot take a call now.

        Costs one round trip, and only when asked for (``block=False``) or
        when the pool sets ``max_waiting``.

        Raises:
            PoolExhausted
        """
        if block and pool.max_waiting is None:
            return
        now = self.status(pool.name)
        if pool.max_waiting is not None and now.waiting >= pool.max_waiting:
            raise PoolExhausted(f"pool {pool.name!r} has {now.waiting} calls waiting (max_waiting {pool.max_waiting})")
        if not block and now.available == 0 and not now.can_grow:
            raise PoolExhausted(f"no agent of pool {pool.name!r} is free and its overflow is spent")

    def send(
        self,
        pool: PoolConfig,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        op: str | None,
        timeout: float | None,
        call_timeout: float | None,
        reply_to: str | None,
        task_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> str:
        """Put the call on the pool's queue; its id.

        ``reply_to`` names the Redis list for the reply (``call``); without
        one the result goes to Celery's result backend (``cast``).
        """
        task_id = task_id or str(uuid.uuid4())
        message_headers: dict[str, Any] = {protocol.HEADER_OP: op, **(headers or {})}
        if reply_to:
            message_headers[protocol.HEADER_REPLY] = reply_to
        with self.translate_errors():
            self.app.send_task(
                pool.task_name,
                args=args,
                kwargs=kwargs,
                task_id=task_id,
                queue=pool.queue,
                routing_key=pool.queue,
                expires=timeout,
                soft_time_limit=call_timeout,
                ignore_result=bool(reply_to),
                headers=message_headers,
            )
        return task_id

    def give_up(self, task_id: str) -> bool:
        """Claim a call as expired; True when no agent had started it (it never will)."""
        with self.translate_errors():
            return protocol.expire(self.scripts, task_id)

    @staticmethod
    @contextmanager
    def translate_errors() -> Iterator[None]:
        """Turn a lost broker or state Redis into :class:`BrokerUnavailable`."""
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError) as exc:
            raise BrokerUnavailable(f"cannot reach the broker or the state Redis: {exc}") from exc

    @functools.cached_property
    def _queue_in_state(self) -> bool:
        return same_redis(self.config.broker_url, self.config.state_url)


class Handle:
    """The result of a :func:`cast`, now or later, here or in another process.

    Example::

        handle = poolq.cast("embed", texts=["hello"])
        later = poolq.Handle(handle.id)        # in another process
        vectors = later.result(timeout=30)
    """

    def __init__(self, task_id: str, client: Client | None = None) -> None:
        self.id = task_id
        self._client = client

    def __repr__(self) -> str:
        return f"<poolq.Handle {self.id}>"

    @property
    def _async(self) -> AsyncResult:
        return AsyncResult(self.id, app=(self._client or default_client()).app)

    @property
    def state(self) -> str:
        """Celery's state of the call: PENDING, STARTED, SUCCESS or FAILURE."""
        with Client.translate_errors():
            return str(self._async.state)

    def ready(self) -> bool:
        """Whether the call has finished (successfully or not)."""
        with Client.translate_errors():
            return bool(self._async.ready())

    def result(self, timeout: float | None = None) -> Any:
        """Wait up to ``timeout`` seconds (default: forever) and return the result.

        Raises:
            ResultTimeout: the call has not finished within ``timeout``.
            CheckoutTimeout, CallTimeout, AgentError, ...: as :meth:`Client.call`.
        """
        result = self._async
        try:
            with Client.translate_errors():
                value = result.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
        except celery.exceptions.TimeoutError:
            raise ResultTimeout(f"cast {self.id} has not finished after {timeout:g}s") from None
        if result.successful():
            return value
        raise remote_error(value, result.traceback or "")


def remote_error(exc: BaseException, remote_traceback: str) -> PoolqError:
    """The typed poolq error for an exception Celery stored for a failed cast."""
    if isinstance(exc, PoolqError):
        return exc
    if isinstance(exc, (celery.exceptions.SoftTimeLimitExceeded, celery.exceptions.TimeLimitExceeded)):
        return CallTimeout(f"the agent did not finish the call within its time limit ({exc})")
    cls = type(exc)
    name = (
        cls.__qualname__
        if cls.__module__ in ("builtins", "celery.utils.serialization")
        else f"{cls.__module__}.{cls.__qualname__}"
    )
    message = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
    return AgentError(name, message, remote_traceback)


def check_seconds(name: str, value: float) -> float:
    """``value`` as float seconds; ValueError unless it is a positive number."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


@functools.cache
def default_client() -> Client:
    """The client built from the environment (``POOLQ_CONFIG``, ``POOLQ_BROKER_URL``)."""
    app = default_app()
    return Client(app.poolq_config, app=app)


def call(
    pool: str,
    *args: Any,
    op: str | None = None,
    timeout: float | None = None,
    call_timeout: float | None = None,
    block: bool = True,
    **kwargs: Any,
) -> Any:
    """Run a call on ``pool`` and wait for its result (see :meth:`Client.call`)."""
    return default_client().call(pool, *args, op=op, timeout=timeout, call_timeout=call_timeout, block=block, **kwargs)


def status(pool: str) -> PoolStatus:
    """The pool's state, counters and agents (see :meth:`Client.status`)."""
    return default_client().status(pool)


def cast(
    pool: str,
    *args: Any,
    op: str | None = None,
    timeout: float | None = None,
    call_timeout: float | None = None,
    block: bool = True,
    **kwargs: Any,
) -> Handle:
    """Send a call to ``pool`` and return a :class:`Handle` at once (see :meth:`Client.cast`)."""
    return default_client().cast(pool, *args, op=op, timeout=timeout, call_timeout=call_timeout, block=block, **kwargs)


def lease(pool: str, timeout: float | None = None, ttl: float | None = None, block: bool = True) -> Lease:
    """Hold one agent of ``pool`` for several calls (see :meth:`Client.lease`)."""
    return default_client().lease(pool, timeout=timeout, ttl=ttl, block=block)


def map(pool: str, items: Iterable[Any], **options: Any) -> list[Any]:
    """Call ``pool`` once per item; results in input order (see :meth:`Client.map`)."""
    return default_client().map(pool, items, **options)


def drain(pool: str, timeout: float | None = None) -> PoolStatus:
    """Wait for the pool's quiescence (see :meth:`Client.drain`)."""
    return default_client().drain(pool, timeout=timeout)
