"""The client, waiting in threads: ``call`` (send and wait), ``cast`` (send, read later), leases, status.

The call path, top to bottom (the steps are :func:`poolq.client.core.call`)::

    call(pool, *args, **keywords)
      -> check pool, options, payload                (typed errors, nothing sent)
      -> the pool open? (closed, degraded: refused)  (its state read once a second)
      -> Celery send_task to queue poolq.<pool>      (headers: reply list, deadline; shown as poolq.<pool>.<op>)
      -> BLPOP poolq:reply:<id> until the deadline
         -> nothing yet: try to claim the call as given up
            -> won: CheckoutTimeout (the call will never run)
            -> an agent has it: wait call_timeout + grace more (poolq.client.waiting)
      -> decode the reply: the result, or the typed error it carries
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar, overload

import amqp.exceptions
import kombu.exceptions
import redis
from celery import Celery

from ..app import create_app, default_app
from ..config import Config, load_config
from ..errors import BrokerUnavailable, PoolqError, PoolqTimeout
from ..store import connection, keys, protocol, queues, ratelimit, registry
from ..store.status import PoolStatus, read_status
from . import core, mapping, options
from .core import Alive, Effect, Inspect, PeekRate, Pop, Push, ReadPool, ReadStatus, Send
from .handle import Handle
from .lease import Lease
from .mapping import Completed

T = TypeVar("T")

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


class Client:
    """A connection to one poolq deployment (its config, broker and state Redis).

    Most code uses the module functions :func:`call` and :func:`cast`, which
    share one client built from the environment; build a ``Client`` yourself
    to talk to another deployment.
    """

    def __init__(self, config: Config | None = None, app: Celery | None = None) -> None:
        self.config = config or load_config()
        self._app = app
        self.gate = core.Gate()

    @functools.cached_property
    def app(self) -> Celery:
        """The Celery app that sends this client's calls."""
        return self._app or create_app(self.config)

    @functools.cached_property
    def state(self) -> redis.Redis:
        """The state Redis (replies, claims, registry)."""
        return connection.connect(self.config.state_url)

    @functools.cached_property
    def scripts(self) -> connection.Scripts:
        return connection.Scripts(self.state)

    def close(self) -> None:
        """Close this client's connections (it reconnects if used again)."""
        if "scripts" in self.__dict__:
            self.scripts.close()
        if "state" in self.__dict__:
            self.state.close()
        if "app" in self.__dict__ and self._app is None:
            self.app.close()  # its broker connections and producer pool

    def call(self, pool: str, /, *args: Any, **keywords: Any) -> Any:
        """Run an operation on an agent of ``pool`` and return its result.

        ``args`` and ``keywords`` are the operation's arguments (plain JSON),
        except these keywords, the call's options:

        - ``op``: the agent operation; ``None`` (default) runs ``handle``.
        - ``timeout``: seconds to wait for a free agent (default: the pool's).
          A call not started by then never runs.
        - ``call_timeout``: seconds the agent may spend on it (default: the pool's).
        - ``block``: ``False`` fails at once with ``PoolExhausted`` when no agent
          is free and overflow is spent, instead of waiting in the queue (with
          ``RateLimited``, a ``PoolExhausted``, when the pool's ``rate_limit``
          has no slot free now).
        - ``kwargs``: more keyword arguments for the operation, for names the
          client keeps for itself (``timeout``, ``op``, ...).

        The caller waits at most ``timeout + call_timeout + 2`` seconds, plus
        the same again for each delivery lost to an agent that died (see
        :mod:`poolq.client.waiting`).

        Raises:
            UnknownPool, InvalidOption, InvalidPayload, PoolExhausted, PoolDegraded, PoolClosed: before sending.
            CheckoutTimeout: no agent took the call within ``timeout``.
            CallTimeout: the agent did not finish within ``call_timeout``.
            CallCancelled: the call was cancelled (Ctrl-C here cancels it: see :meth:`Handle.revoke`).
            AgentError: the agent raised; ``remote_type``, ``message`` and
                ``remote_traceback`` describe it.
            UnknownOperation, InvalidArguments, AgentUnavailable, AgentCrashed, BrokerUnavailable.
        """
        spec = core.admit(self.config, pool, args, keywords)
        task_id = str(uuid.uuid4())
        redelivery = self.config.redelivery_window
        try:
            return self.run(core.call(self.gate, spec, task_id, keys.reply(task_id), redelivery))
        except KeyboardInterrupt:
            # Ctrl-C: nobody will read the reply, so cancel the call (see
            # Handle.revoke), best effort, and stop anyway.
            with contextlib.suppress(redis.RedisError, OSError):
                protocol.cancel(self.scripts, task_id)
            raise

    def cast(self, pool: str, /, *args: Any, **keywords: Any) -> Handle:
        """Send a call and return at once with a :class:`Handle` on its result.

        The options are those of :meth:`call`, but ``timeout`` (how long the
        call may wait in the queue) defaults to none.
        """
        spec = core.admit(self.config, pool, args, keywords, queue_forever=True)
        task_id = str(uuid.uuid4())
        self.run(core.cast(self.gate, spec, task_id))
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

    @overload
    def map(self, pool: str, items: Iterable[Any], *, ordered: Literal[True] = ..., **options: Any) -> list[Any]: ...

    @overload
    def map(
        self, pool: str, items: Iterable[Any], *, ordered: Literal[False], **options: Any
    ) -> Generator[Completed, None, None]: ...

    @overload
    def map(
        self, pool: str, items: Iterable[Any], *, ordered: bool, **options: Any
    ) -> list[Any] | Generator[Completed, None, None]: ...

    def map(
        self, pool: str, items: Iterable[Any], *, ordered: bool = True, **options: Any
    ) -> list[Any] | Generator[Completed, None, None]:
        """Call ``pool`` once per item, at most ``concurrency`` at a time; results in input order.

        With ``ordered=False``, an iterator of :class:`~poolq.Completed`
        ``(index, result)`` pairs instead, each as soon as its call completes.
        It reads ``items`` lazily and sends the next one as each result is
        taken. Leaving it early (``break``, ``close()``) cancels the calls in
        flight (queued ones never run; see :meth:`Handle.revoke`) and ends its thread::

            for index, result in client.map("echo", texts, ordered=False):
                print(texts[index], "->", result)

        The options are those of :meth:`poolq.client.aio.AsyncClient.map`.
        """
        from .aio import AsyncClient, run_sync

        if ordered:
            return list(run_sync(lambda aclient: aclient.map(pool, items, **options), self))
        aclient = AsyncClient(self)
        return mapping.iterate(aclient, aclient.map(pool, items, ordered=False, **options))

    def wait_quiet(self, pool: str, timeout: float | None = None) -> PoolStatus:
        """Wait until nothing waits in the pool's queue and no agent is busy or leased (quiescence).

        Raises:
            PoolqTimeout: not quiet within ``timeout`` seconds.
        """
        from .aio import run_sync

        status: PoolStatus = run_sync(lambda aclient: aclient.wait_quiet(pool, timeout=timeout), self)
        return status

    def drain(self, pool: str) -> dict[str, int]:
        """Retire the pool's idle agents above each node's base size now, instead of after ``overflow_idle``.

        Returns each node's count of agents retired.

        Raises:
            UnknownPool, BrokerUnavailable
        """
        nodes = [node.id for node in self.status(pool).nodes]
        if not nodes:
            return {}
        with self.translate_errors():
            replies = self.app.control.broadcast(
                "poolq_drain", arguments={"pool": pool}, destination=nodes, reply=True, timeout=2.0
            )
        return {node: int(answer.get("retired", 0)) for reply in replies for node, answer in reply.items()}

    def stop(self, pool: str, timeout: float = 300.0) -> list[str]:
        """Close the pool and stop every one of its worker nodes gracefully (Celery's warm shutdown); their names.

        In-flight calls finish; calls still queued, or prefetched but not
        started, stay in the queue for later nodes; agents are torn down. From
        now on calls fail at once with :class:`~poolq.errors.PoolClosed`, until
        a node of the pool starts again. Waits until the nodes have left the registry.

        Raises:
            PoolqTimeout: a node is still running after ``timeout`` seconds.
        """
        with self.translate_errors():
            self.state.hset(keys.stats(self.config.pool(pool).name), "closed", time.strftime("%Y-%m-%d %H:%M:%S"))
        self.gate.forget(pool)
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

    # -- carrying the core's effects out, in this thread ---------------------

    def run(self, steps: core.Steps[T]) -> T:
        """Drive steps of :mod:`poolq.client.core` to their end."""
        return core.run(steps, self.perform)

    def perform(self, effect: Effect) -> Any:
        """Carry one effect out."""
        with self.translate_errors():
            if isinstance(effect, Pop):
                # Rides out a state Redis restart until the deadline.
                return self.scripts.pop(effect.key, effect.deadline)
            if isinstance(effect, Send):
                return self.send(effect)
            if isinstance(effect, Inspect):
                return self.inspect(effect.task_id, effect.reply_to, effect.result)
            if isinstance(effect, ReadPool):
                return {str(k): str(v) for k, v in self.state.hgetall(keys.stats(effect.pool)).items()}
            if isinstance(effect, ReadStatus):
                return self.status(effect.pool)
            if isinstance(effect, Push):
                pipe = self.state.pipeline(transaction=False)
                pipe.rpush(effect.key, effect.value)
                pipe.expire(effect.key, effect.ttl)
                pipe.execute()
                return None
            if isinstance(effect, Alive):
                return registry.is_alive(self.state, effect.agent_id)
            if isinstance(effect, PeekRate):
                return ratelimit.peek(self.scripts, effect.pool, effect.rate)
        raise TypeError(f"not an effect: {effect!r}")

    def send(self, effect: Send) -> None:
        """Put the call on the pool's queue.

        The deadline for an agent to take the call travels in a poolq header,
        not in Celery's ``expires``: Celery drops an expired message unseen,
        even a call an agent already started and that must be taken over after a crash.

        Celery's ``shadow`` names the call ``poolq.<pool>.<op>`` in its logs
        and events (Flower), while the message still names the pool's task.
        Its ``argsrepr`` and ``kwargsrepr`` (what logs and Flower show of the
        arguments) stay Celery's own: the operation's arguments, cut at
        1024 characters each; poolq's options travel in headers, never shown.

        Raises:
            BrokerUnavailable: the broker stayed unreachable for about a second.
        """
        spec = effect.spec
        headers = {
            protocol.HEADER_OP: spec.op,
            protocol.HEADER_REPLY: effect.reply_to,
            protocol.HEADER_CALL_TIMEOUT: spec.call_timeout,
            protocol.HEADER_DEADLINE: protocol.deadline_after(spec.timeout),
            protocol.HEADER_SENT: time.time(),
            **effect.headers,
        }
        if effect.result:
            headers[protocol.HEADER_RESULT] = effect.result
        with self.translate_errors():
            self.app.send_task(
                spec.pool.task_name,
                args=spec.args,
                kwargs=spec.kwargs,
                task_id=effect.task_id,
                shadow=core.shown_name(spec, lease=protocol.HEADER_LEASE in effect.headers),
                queue=spec.pool.queue,
                routing_key=spec.pool.queue,
                headers=headers,
                retry=True,
                retry_policy=PUBLISH_RETRY,
            )

    def inspect(self, task_id: str, reply_to: str = "", result: str = "") -> protocol.ClaimView:
        """Give the call up unless an agent holds it; the claim as it stands then."""
        return protocol.inspect(self.scripts, task_id, reply_to, result, self.config.project.result_expires)

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
        return queues.same_redis(self.config.broker_url, self.config.state_url)


@functools.cache
def default_client() -> Client:
    """The client built from the environment (``POOLQ_CONFIG``, ``POOLQ_BROKER_URL``)."""
    app = default_app()
    return Client(app.poolq_config, app=app)


def call(pool: str, /, *args: Any, **keywords: Any) -> Any:
    """Run a call on ``pool`` and wait for its result (see :meth:`Client.call`)."""
    return default_client().call(pool, *args, **keywords)


def cast(pool: str, /, *args: Any, **keywords: Any) -> Handle:
    """Send a call to ``pool`` and return a :class:`Handle` at once (see :meth:`Client.cast`)."""
    return default_client().cast(pool, *args, **keywords)


def status(pool: str) -> PoolStatus:
    """The pool's state, counters and agents (see :meth:`Client.status`)."""
    return default_client().status(pool)


def lease(pool: str, timeout: float | None = None, ttl: float | None = None, block: bool = True) -> Lease:
    """Hold one agent of ``pool`` for several calls (see :meth:`Client.lease`)."""
    return default_client().lease(pool, timeout=timeout, ttl=ttl, block=block)


@overload
def map(pool: str, items: Iterable[Any], *, ordered: Literal[True] = ..., **options: Any) -> list[Any]: ...


@overload
def map(
    pool: str, items: Iterable[Any], *, ordered: Literal[False], **options: Any
) -> Generator[Completed, None, None]: ...


@overload
def map(
    pool: str, items: Iterable[Any], *, ordered: bool, **options: Any
) -> list[Any] | Generator[Completed, None, None]: ...


def map(
    pool: str, items: Iterable[Any], *, ordered: bool = True, **options: Any
) -> list[Any] | Generator[Completed, None, None]:
    """Call ``pool`` once per item; results in input order, or ``(index, result)`` as they complete.

    See :meth:`Client.map`.
    """
    return default_client().map(pool, items, ordered=ordered, **options)


def wait_quiet(pool: str, timeout: float | None = None) -> PoolStatus:
    """Wait for the pool's quiescence (see :meth:`Client.wait_quiet`)."""
    return default_client().wait_quiet(pool, timeout=timeout)


def drain(pool: str) -> dict[str, int]:
    """Retire the pool's idle agents above each node's base size now (see :meth:`Client.drain`)."""
    return default_client().drain(pool)
