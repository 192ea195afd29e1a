"""The client: ``call`` (send and wait) and ``cast`` (send, resolve later).

The call path, top to bottom::

    call(pool, *args, **kwargs)
      -> check pool, options, payload                (typed errors, nothing sent)
      -> Celery send_task to queue poolq.<pool>      (headers: reply list, deadline)
      -> BLPOP poolq:reply:<id> until the deadline
         -> nothing yet: try to claim the call as given up
            -> won: CheckoutTimeout (the call will never run)
            -> an agent has it: wait call_timeout + grace more (poolq.client.waiting)
      -> decode the reply: the result, or the typed error it carries
"""

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import amqp.exceptions
import kombu.exceptions
import redis
from celery import Celery

from ..app import create_app, default_app
from ..config import Config, PoolConfig, load_config
from ..errors import (
    BrokerUnavailable,
    PoolClosed,
    PoolDegraded,
    PoolExhausted,
    PoolqError,
    PoolqTimeout,
    ResultTimeout,
)
from ..store import protocol, queues, registry
from ..store.queues import same_redis
from ..store.status import PoolStatus, read_status
from . import options
from .lease import Lease
from .waiting import CallWait

#: Seconds a client trusts what it last read of a pool's circuit breaker.
BREAKER_CACHE = 1.0
#: How hard Celery tries to publish while the broker is unreachable: about a
#: second in all, then the call fails with BrokerUnavailable.
PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.3, "interval_max": 0.5}
#: Errors that mean the broker or the state Redis cannot be reached.
CONNECTION_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    kombu.exceptions.OperationalError,
    amqp.exceptions.RecoverableConnectionError,
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True)
class CallSpec:
    """A call checked at the boundary, ready to be sent."""

    pool: PoolConfig
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    op: str | None
    #: Seconds the call may wait for an agent; None: forever (a cast's default).
    timeout: float | None
    #: Seconds the agent may spend on it; None for a lease (its calls carry their own).
    call_timeout: float | None


class Client:
    """A connection to one poolq deployment (its config, broker and state Redis).

    Most code uses the module functions :func:`call` and :func:`cast`, which
    share one client built from the environment; build a ``Client`` yourself
    to talk to another deployment.
    """

    def __init__(self, config: Config | None = None, app: Celery | None = None) -> None:
        self.config = config or load_config()
        self._app = app
        #: Per pool: when its state was read, and why calls are refused (None: they are not).
        self._breakers: dict[str, tuple[float, tuple[type[PoolqError], str] | None]] = {}

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
        kwargs: Mapping[str, Any] | None = None,
        **keywords: Any,
    ) -> Any:
        """Run ``op`` (default ``handle``) on an agent of ``pool`` and return its result.

        Parameters:
            pool: a configured pool name.
            args, keywords: the operation's arguments (plain JSON).
            op: the agent operation; ``None`` runs ``handle``.
            timeout: seconds to wait for a free agent (default: the pool's).
                A call not started by then never runs.
            call_timeout: seconds the agent may spend on it (default: the pool's).
            block: ``False`` fails at once with ``PoolExhausted`` when no agent
                is free and overflow is spent, instead of waiting in the queue.
            kwargs: more keyword arguments for the operation, for names the
                client keeps for itself (``timeout``, ``op``, ...).

        The caller waits at most ``timeout + call_timeout + 2`` seconds, plus
        the same again for each delivery lost to an agent that died (see
        :mod:`poolq.client.waiting`).

        Raises:
            UnknownPool, InvalidOption, InvalidPayload, PoolExhausted, PoolDegraded: before anything is sent.
            CheckoutTimeout: no agent took the call within ``timeout``.
            CallTimeout: the agent did not finish within ``call_timeout``.
            AgentError: the agent raised; ``remote_type``, ``message`` and
                ``remote_traceback`` describe it.
            UnknownOperation, InvalidArguments, AgentUnavailable, AgentCrashed, BrokerUnavailable.
        """
        spec = self.admit(pool, args, options.keywords(keywords, kwargs), op, timeout, call_timeout, block)
        self.check_capacity(spec.pool, block)
        task_id = str(uuid.uuid4())
        reply_to = protocol.reply_key(task_id)
        self.send(spec, task_id, reply_to)
        return protocol.decode_reply(self.wait_reply(spec, task_id, reply_to))

    def cast(
        self,
        pool: str,
        *args: Any,
        op: str | None = None,
        timeout: float | None = None,
        call_timeout: float | None = None,
        block: bool = True,
        kwargs: Mapping[str, Any] | None = None,
        **keywords: Any,
    ) -> Handle:
        """Send a call and return at once with a :class:`Handle` on its result.

        ``timeout`` (default: none) is how long the call may wait in the queue;
        the other parameters and errors are those of :meth:`call`.
        """
        spec = self.admit(
            pool, args, options.keywords(keywords, kwargs), op, timeout, call_timeout, block, queue_forever=True
        )
        self.check_capacity(spec.pool, block)
        task_id = str(uuid.uuid4())
        self.send(spec, task_id, protocol.reply_key(task_id), result=protocol.result_key(task_id))
        deadline = None if spec.timeout is None else time.monotonic() + spec.timeout
        return Handle(task_id, client=self, deadline=deadline)

    def lease(self, pool: str, timeout: float | None = None, ttl: float | None = None, block: bool = True) -> Lease:
        """Hold one agent of ``pool`` for several calls (see :class:`~poolq.client.lease.Lease`).

        Parameters:
            timeout: seconds to wait for an agent (default: the pool's).
            ttl: seconds the lease may go without a call before its agent is
                taken back (the client is presumed dead).
            block: ``False`` fails at once with ``PoolExhausted`` when no agent is free.
        """
        return Lease(self, pool, timeout=timeout, ttl=ttl, block=block)

    def map(self, pool: str, items: Iterable[Any], **options: Any) -> list[Any]:
        """Call ``pool`` once per item, at most ``concurrency`` at a time; results in input order.

        The options are those of :meth:`poolq.client.aio.AsyncClient.map`.
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
        """Close the pool and stop every one of its worker nodes gracefully (Celery's warm shutdown); their names.

        In-flight calls finish; calls still queued, or prefetched but not
        started, stay in the queue for later nodes; agents are torn down. From
        now on calls fail at once with :class:`~poolq.errors.PoolClosed`, until
        a node of the pool starts again. Waits until the nodes have left the registry.

        Raises:
            PoolqTimeout: a node is still running after ``timeout`` seconds.
        """
        with self.translate_errors():
            self.state.hset(
                registry.stats_key(self.config.pool(pool).name), "closed", time.strftime("%Y-%m-%d %H:%M:%S")
            )
        self._breakers.pop(pool, None)
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
        config = self.config.pool(options.pool_name(pool))
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
        op: str | None,
        timeout: float | None,
        call_timeout: float | None,
        block: bool,
        queue_forever: bool = False,
    ) -> CallSpec:
        """Check a call at the boundary, before anything is sent: pool, options, payload, breaker.

        ``timeout`` defaults to the pool's, or to none with ``queue_forever`` (a cast).

        Raises:
            UnknownPool, InvalidOption, InvalidPayload, PoolDegraded
        """
        config = self.config.pool(options.pool_name(pool))
        options.flag("block", block)
        spec = CallSpec(
            pool=config,
            args=args,
            kwargs=kwargs,
            op=options.operation(op),
            timeout=options.seconds("timeout", timeout, None if queue_forever else config.timeout),
            call_timeout=options.seconds("call_timeout", call_timeout, config.call_timeout) or config.call_timeout,
        )
        protocol.check_arguments(config.name, args, kwargs, config.max_payload_bytes)
        self.check_open(config)  # a Redis read at most once a second
        return spec

    def check_open(self, pool: PoolConfig) -> None:
        """Fail fast while the pool is closed (stopped on purpose) or degraded (its setups keep failing).

        Reads the pool's state at most once per :data:`BREAKER_CACHE`
        seconds, so it costs the call path a round trip once a second, not per call.

        Raises:
            PoolClosed, PoolDegraded, BrokerUnavailable
        """
        now = time.monotonic()
        checked_at, refusal = self._breakers.get(pool.name, (-math.inf, None))
        if now - checked_at >= BREAKER_CACHE:
            with self.translate_errors():
                stats = {str(k): str(v) for k, v in self.state.hgetall(registry.stats_key(pool.name)).items()}
            refusal = None
            if stats.get("closed"):
                refusal = (PoolClosed, f"pool {pool.name!r} was stopped on purpose ({stats['closed']}); start a node")
            elif registry.breaker_open(stats, time.time()):
                error = stats.get("breaker_error", "")
                refusal = (PoolDegraded, f"pool {pool.name!r} is degraded, its agents fail to set up: {error}")
            self._breakers[pool.name] = (now, refusal)
        if refusal is not None:
            cls, message = refusal
            raise cls(message)

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
        spec: CallSpec,
        task_id: str,
        reply_to: str,
        result: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Put the call on the pool's queue; the reply goes to the list ``reply_to``.

        ``result`` names the key that keeps a cast's result. The deadline for
        an agent to take the call travels in a poolq header, not in Celery's
        ``expires``: Celery drops an expired message unseen, even a call an
        agent already started and that must be taken over after a crash.

        Raises:
            BrokerUnavailable: the broker stayed unreachable for about a second.
        """
        message_headers: dict[str, Any] = {
            protocol.HEADER_OP: spec.op,
            protocol.HEADER_REPLY: reply_to,
            protocol.HEADER_CALL_TIMEOUT: spec.call_timeout,
            protocol.HEADER_DEADLINE: protocol.deadline_after(spec.timeout),
            **(headers or {}),
        }
        if result:
            message_headers[protocol.HEADER_RESULT] = result
        with self.translate_errors():
            self.app.send_task(
                spec.pool.task_name,
                args=spec.args,
                kwargs=spec.kwargs,
                task_id=task_id,
                queue=spec.pool.queue,
                routing_key=spec.pool.queue,
                headers=message_headers,
                retry=True,
                retry_policy=PUBLISH_RETRY,
            )

    def wait_reply(self, spec: CallSpec, task_id: str, reply_to: str, what: str = "call") -> str:
        """Wait for the reply of a sent call, as :mod:`poolq.client.waiting` says; the raw reply.

        Raises:
            CheckoutTimeout, CallTimeout, BrokerUnavailable.
        """
        assert spec.timeout is not None and spec.call_timeout is not None
        wait = CallWait(
            pool=spec.pool.name,
            timeout=spec.timeout,
            call_timeout=spec.call_timeout,
            max_deliveries=spec.pool.max_deliveries,
            redelivery=self.config.redelivery_window,
            started=time.monotonic(),
            what=what,
        )
        deadline = wait.first_deadline
        with self.translate_errors():
            while True:
                reply = self.scripts.pop(reply_to, deadline)
                if reply is not None:
                    return reply
                deadline = wait.next_deadline(time.monotonic(), self.inspect(task_id, reply_to))

    def inspect(self, task_id: str, reply_to: str = "", result: str = "") -> protocol.ClaimView:
        """Give the call up unless an agent holds it; the claim as it stands then."""
        owner, attempts = protocol.give_up(
            self.scripts, task_id, reply_to=reply_to, result=result, result_ttl=self.config.project.result_expires
        )
        alive = owner not in ("", protocol.EXPIRED, protocol.DONE) and bool(
            self.scripts.command("EXISTS", protocol.agent_key(owner))
        )
        return protocol.ClaimView(owner=owner, attempts=attempts, alive=alive)

    @staticmethod
    @contextmanager
    def translate_errors() -> Iterator[None]:
        """Turn a lost broker or state Redis into :class:`BrokerUnavailable`."""
        try:
            yield
        except PoolqError:
            raise  # poolq's own timeouts are TimeoutErrors too
        except CONNECTION_ERRORS as exc:
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

    Its result stays readable by id for ``result_expires`` seconds (``[poolq]``
    in the configuration, a day by default), and raises the same typed errors
    as :func:`call`.
    """

    #: Longest single wait on the result's notification list: another reader
    #: may take the notification, so each slice looks at the stored result again.
    SLICE = 1.0

    def __init__(self, task_id: str, client: Client | None = None, deadline: float | None = None) -> None:
        self.id = task_id
        self._client = client
        #: When the cast stops waiting for an agent (monotonic; known to the process that sent it).
        self._deadline = deadline

    def __repr__(self) -> str:
        return f"<poolq.Handle {self.id}>"

    @property
    def client(self) -> Client:
        return self._client or default_client()

    @property
    def state(self) -> str:
        """The state of the call: PENDING (queued), STARTED (an agent runs it), SUCCESS or FAILURE."""
        client = self.client
        with client.translate_errors():
            stored = client.state.get(protocol.result_key(self.id))
            if stored is not None:
                return "SUCCESS" if "ok" in json.loads(stored) else "FAILURE"
            owner = client.state.hget(protocol.claim_key(self.id), "owner")
        if owner == protocol.EXPIRED:
            return "FAILURE"
        return "PENDING" if owner is None else "STARTED"

    def ready(self) -> bool:
        """Whether the call has finished (successfully or not)."""
        client = self.client
        with client.translate_errors():
            return bool(client.state.exists(protocol.result_key(self.id)))

    def result(self, timeout: float | None = None) -> Any:
        """Wait up to ``timeout`` seconds (default: forever) and return the result.

        Raises:
            ResultTimeout: the call has not finished within ``timeout``.
            CheckoutTimeout, CallTimeout, AgentError, AgentCrashed, ...: as :meth:`Client.call`.
        """
        client = self.client
        timeout = options.seconds("timeout", timeout)
        give_up_at = self._deadline
        until = math.inf if timeout is None else time.monotonic() + timeout
        key, notify = protocol.result_key(self.id), protocol.reply_key(self.id)
        with client.translate_errors():
            while True:
                stored = client.scripts.command("GET", key)
                if stored is not None:
                    return protocol.decode_reply(str(stored))
                now = time.monotonic()
                if give_up_at is not None and now >= give_up_at:
                    # Nobody took the cast within its timeout: close it (a
                    # CheckoutTimeout result), unless an agent holds it.
                    client.inspect(self.id, result=key)
                    give_up_at = None
                    continue
                if now >= until:
                    raise ResultTimeout(f"cast {self.id} has not finished after {timeout:g}s")
                slice_end = min(until, now + self.SLICE, give_up_at or math.inf)
                reply = client.scripts.pop(notify, slice_end)
                if reply is not None:
                    return protocol.decode_reply(reply)


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
    kwargs: Mapping[str, Any] | None = None,
    **keywords: Any,
) -> Any:
    """Run a call on ``pool`` and wait for its result (see :meth:`Client.call`)."""
    return default_client().call(
        pool, *args, op=op, timeout=timeout, call_timeout=call_timeout, block=block, kwargs=kwargs, **keywords
    )


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
    kwargs: Mapping[str, Any] | None = None,
    **keywords: Any,
) -> Handle:
    """Send a call to ``pool`` and return a :class:`Handle` at once (see :meth:`Client.cast`)."""
    return default_client().cast(
        pool, *args, op=op, timeout=timeout, call_timeout=call_timeout, block=block, kwargs=kwargs, **keywords
    )


def lease(pool: str, timeout: float | None = None, ttl: float | None = None, block: bool = True) -> Lease:
    """Hold one agent of ``pool`` for several calls (see :meth:`Client.lease`)."""
    return default_client().lease(pool, timeout=timeout, ttl=ttl, block=block)


def map(pool: str, items: Iterable[Any], **options: Any) -> list[Any]:
    """Call ``pool`` once per item; results in input order (see :meth:`Client.map`)."""
    return default_client().map(pool, items, **options)


def drain(pool: str, timeout: float | None = None) -> PoolStatus:
    """Wait for the pool's quiescence (see :meth:`Client.drain`)."""
    return default_client().drain(pool, timeout=timeout)
