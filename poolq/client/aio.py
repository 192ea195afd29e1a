"""asyncio: ``await poolq.acall(...)``, ``async with poolq.alease(...)``, ``poolq.amap``.

No thread waits for a reply, and nothing blocks the event loop. Every call
made from one event loop names the same Redis list (its mailbox) as its reply
list, and one task per loop pops replies off it in batches and resolves the
callers' futures by call id, so a thousand calls in flight cost one
connection and one task. Sending a call goes through a few threads (kombu's
publish is synchronous), never one per waiting call.

The steps of a call or a lease are those of the sync client
(:mod:`poolq.client.core`); only their effects are carried out here, awaited.

Example::

    async def handler(text: str) -> dict:
        return await poolq.acall("sentiment", text=text, timeout=2)
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import redis
import redis.asyncio

from ..errors import BlockingInEventLoop, BrokerUnavailable, PoolqTimeout
from ..store import connection, keys, protocol, ratelimit
from ..store.status import PoolStatus
from . import core, mapping
from .core import Alive, Effect, Inspect, PeekRate, Pop, Push, ReadPool, ReadStatus, Send
from .lease import LeaseCore
from .mapping import Arguments, Completed
from .sync import Client, default_client

T = TypeVar("T")

logger = logging.getLogger("poolq.client")

#: Threads that publish calls for one async client.
SEND_THREADS = 4
#: Replies taken off the mailbox per round trip once one arrived.
DRAIN_BATCH = 256
#: Seconds a cancelled ``acall`` spends withdrawing its call before it lets the cancel through regardless.
WITHDRAW_TIMEOUT = 2.0


class _Mailbox:
    """The reply list of one client in one event loop, and the task that reads it."""

    def __init__(self, state: redis.asyncio.Redis) -> None:
        self.key = keys.mailbox(str(uuid.uuid4()))
        self.state = state
        self.pending: dict[str, asyncio.Future[str]] = {}
        self.reader: asyncio.Task[None] | None = None

    def expect(self, task_id: str) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pending[task_id] = future
        if self.reader is None:
            self.reader = asyncio.get_running_loop().create_task(self._read())
        return future

    async def wait(self, task_id: str, deadline: float) -> str | None:
        """The reply to ``task_id`` if it comes before ``deadline`` (monotonic)."""
        future = self.pending.get(task_id) or self.expect(task_id)
        await asyncio.wait([future], timeout=max(0.0, deadline - time.monotonic()))
        return future.result() if future.done() else None

    async def _read(self) -> None:
        delay = 0.05
        try:
            while self.pending:
                try:
                    popped = await self.state.blpop([self.key], timeout=connection.BLOCK_SLICE)
                    if popped is None:
                        continue
                    batch = [popped[1], *(await self.state.lpop(self.key, DRAIN_BATCH) or [])]
                except (redis.ConnectionError, redis.TimeoutError):
                    # The state Redis is away (a restart): each call keeps waiting
                    # until its own deadline, then finds out for itself.
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, connection.RECONNECT_BACKOFF_MAX)
                    continue
                delay = 0.05
                for raw in batch:
                    future = self.pending.get(_reply_id(raw))
                    if future is not None and not future.done():
                        future.set_result(str(raw))
        finally:
            self.reader = None


def _reply_id(raw: str) -> str:
    """The call a mailbox reply answers ('' for one that cannot be read: it wakes nobody, and the reader lives on)."""
    try:
        document = json.loads(raw)
    except ValueError:
        return ""
    return str(document.get("id", "")) if isinstance(document, dict) else ""


class AsyncClient:
    """The asyncio face of a :class:`~poolq.Client` (same config, broker and errors)."""

    def __init__(self, client: Client | None = None) -> None:
        self.client = client or default_client()
        self._executor = ThreadPoolExecutor(max_workers=SEND_THREADS, thread_name_prefix="poolq-send")
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
        self._reads: dict[str, asyncio.Future[dict[Any, Any]]] = {}

    def _mailbox(self) -> _Mailbox:
        loop = asyncio.get_running_loop()
        mailbox = self._loops.get(loop)
        if mailbox is None:
            # Blocking: a burst of calls waits its turn for a connection instead of failing.
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self.client.config.state_url,
                max_connections=connection.MAX_CONNECTIONS,
                timeout=connection.SOCKET_TIMEOUT,
                decode_responses=True,
                socket_timeout=connection.SOCKET_TIMEOUT,
                socket_connect_timeout=connection.SOCKET_TIMEOUT,
                socket_keepalive=True,
            )
            mailbox = self._loops[loop] = _Mailbox(redis.asyncio.Redis.from_pool(pool))  # closes the pool with it
        return mailbox

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    async def call(self, pool: str, /, *args: Any, **keywords: Any) -> Any:
        """``await`` a call: the arguments, options, result and errors of :meth:`Client.call`.

        Cancelling the task that awaits it (a web request whose client went
        away, ``asyncio.wait_for`` running out) cancels the call too: still
        queued, it is withdrawn and never runs; running, its agent is asked to
        stop (see :meth:`poolq.Agent.cancelled`). The ``CancelledError`` goes
        on as soon as the withdraw is sent (one round trip, at most
        :data:`WITHDRAW_TIMEOUT` seconds).
        """
        client = self.client
        spec = core.admit(client.config, pool, args, keywords)
        mailbox, task_id = self._mailbox(), str(uuid.uuid4())
        mailbox.expect(task_id)
        try:
            redelivery = client.config.redelivery_window
            return await self.run(core.call(client.gate, spec, task_id, mailbox.key, redelivery))
        except asyncio.CancelledError:
            await _withdraw(mailbox.state, task_id)
            raise
        finally:
            mailbox.pending.pop(task_id, None)

    async def run(self, steps: core.Steps[T]) -> T:
        """Drive steps of :mod:`poolq.client.core` to their end, on this event loop."""
        return await core.arun(steps, self.perform)

    async def perform(self, effect: Effect) -> Any:
        """Carry one effect out, without blocking the loop."""
        mailbox = self._mailbox()
        state = mailbox.state
        try:
            if isinstance(effect, Pop):
                if effect.key == mailbox.key:
                    return await mailbox.wait(effect.task_id, effect.deadline)
                return await _pop(state, effect.key, effect.deadline)
            if isinstance(effect, Send):
                return await self._in_thread(self.client.send, effect)
            if isinstance(effect, Inspect):
                script, count, *names_and_args = protocol.give_up_command(
                    effect.task_id, effect.reply_to, effect.result, self.client.config.project.result_expires
                )
                return protocol.claim_view(await state.eval(script, count, *names_and_args))
            if isinstance(effect, ReadPool):
                return await self._read_pool(state, effect.pool)
            if isinstance(effect, ReadStatus):
                return await self.status(effect.pool)
            if isinstance(effect, Push):
                async with state.pipeline(transaction=False) as pipe:
                    pipe.rpush(effect.key, effect.value)
                    pipe.expire(effect.key, effect.ttl)
                    await pipe.execute()
                return None
            if isinstance(effect, Alive):
                return bool(await state.exists(keys.agent(effect.agent_id)))
            if isinstance(effect, PeekRate):
                script, count, *names_and_args = ratelimit.peek_command(effect.pool, effect.rate)
                return float(await state.eval(script, count, *names_and_args))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot reach the state Redis: {exc}") from exc
        raise TypeError(f"not an effect: {effect!r}")

    async def _read_pool(self, state: redis.asyncio.Redis, pool: str) -> dict[str, str]:
        """The pool's state, read once for all the calls that ask for it at the same time."""
        reading = self._reads.get(pool)
        if reading is None or reading.done():
            reading = self._reads[pool] = asyncio.ensure_future(state.hgetall(keys.stats(pool)))
        return {str(k): str(v) for k, v in (await asyncio.shield(reading)).items()}

    async def aclose(self) -> None:
        """Close this event loop's connections (the mailbox reader ends with them)."""
        mailbox = self._loops.pop(asyncio.get_running_loop(), None)
        if mailbox is not None:
            if mailbox.reader is not None:
                mailbox.reader.cancel()
            await mailbox.state.aclose()

    def lease(
        self, pool: str, timeout: float | None = None, ttl: float | None = None, block: bool = True
    ) -> AsyncLease:
        """An agent of ``pool`` held for several awaited calls (``async with``)."""
        return AsyncLease(self, pool, timeout=timeout, ttl=ttl, block=block)

    async def status(self, pool: str) -> PoolStatus:
        """The pool's status (see :meth:`Client.status`)."""
        return await self._in_thread(self.client.status, pool)

    @overload
    def map(
        self, pool: str, items: Iterable[Any], *, ordered: Literal[True] = ..., **options: Any
    ) -> Coroutine[Any, Any, list[Any]]: ...

    @overload
    def map(
        self, pool: str, items: Iterable[Any], *, ordered: Literal[False], **options: Any
    ) -> AsyncGenerator[Completed, None]: ...

    @overload
    def map(
        self, pool: str, items: Iterable[Any], *, ordered: bool, **options: Any
    ) -> Coroutine[Any, Any, list[Any]] | AsyncGenerator[Completed, None]: ...

    def map(
        self, pool: str, items: Iterable[Any], *, ordered: bool = True, **options: Any
    ) -> Coroutine[Any, Any, list[Any]] | AsyncGenerator[Completed, None]:
        """Call ``pool`` once per item, at most ``concurrency`` calls at a time.

        ``await aclient.map(...)`` gives the results in input order. With
        ``ordered=False`` (no ``await``) it is an async iterator of
        :class:`~poolq.Completed` ``(index, result)`` pairs, each as its call
        completes (see :func:`poolq.client.mapping.as_completed`)::

            async for index, result in aclient.map("echo", texts, ordered=False):
                print(texts[index], "->", result)

        Parameters:
            items: each is the call's single positional argument; with
                ``kwargs=True`` a dict of its keyword arguments; or an
                :class:`Arguments` (positional and keyword arguments).
            op, timeout, call_timeout: each call's options (see :meth:`Client.call`).
            concurrency: calls in flight at once (default: twice the pool's
                agents, so each agent has its next call queued).
            return_exceptions: put each failed item's ``PoolqError`` in its
                place instead of raising the first one.
            on_progress: in input order only, called with (done, total) after every item.

        Raises:
            PoolqError: the first call that failed (without ``return_exceptions``);
                the calls still in flight are no longer waited for.
        """
        if ordered:
            return mapping.in_order(self, pool, items, **options)
        return mapping.as_completed(self, pool, items, **options)

    async def wait_quiet(self, pool: str, timeout: float | None = None, poll: float = 0.1) -> PoolStatus:
        """Wait until the pool is quiet: nothing queued, no agent busy or leased."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = await self.status(pool)
            if status.waiting == 0 and status.in_use == 0:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise PoolqTimeout(f"pool {pool!r} still has {status.waiting} waiting and {status.in_use} in use")
            await asyncio.sleep(poll)


class AsyncLease(LeaseCore):
    """An agent held for several awaited calls; ``async with client.lease(pool) as agent``.

    Its steps are :class:`~poolq.client.lease.LeaseCore`'s, awaited.
    """

    def __init__(self, aclient: AsyncClient, pool: str, timeout: float | None, ttl: float | None, block: bool) -> None:
        super().__init__(aclient.client.config, pool, timeout, ttl, block)
        self.aclient = aclient

    async def __aenter__(self) -> AsyncLease:
        return await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release(broken=isinstance(exc, PoolqTimeout))

    async def acquire(self) -> AsyncLease:
        """Wait for an agent to take the lease (errors of :meth:`Lease.acquire`)."""
        await self.aclient.run(self.acquire_steps(self.aclient.client.gate))
        return self

    async def call(self, *args: Any, **keywords: Any) -> Any:
        """``await`` a call on the leased agent (errors of :meth:`Lease.call`)."""
        return await self.aclient.run(self.call_steps(args, keywords))

    async def release(self, broken: bool = False) -> None:
        """Give the agent back (reset, or recycled when ``broken``). Idempotent."""
        await self.aclient.run(self.release_steps(broken))


async def _withdraw(state: redis.asyncio.Redis, task_id: str) -> None:
    """Cancel the call of a cancelled ``acall``, best effort: never raises but a second ``CancelledError``.

    Awaited before the first cancel goes on, so that once it has, the call is
    withdrawn (or its agent asked to stop). The command is shielded: a second
    cancel stops this wait, not the withdraw. The call may not even be sent
    yet (its send goes on in a thread): its claim says cancelled all the same,
    and the worker that gets it drops it.
    """
    script, count, *names_and_args = protocol.cancel_command(task_id)

    async def send() -> None:
        try:
            answer = await asyncio.wait_for(state.eval(script, count, *names_and_args), WITHDRAW_TIMEOUT)
            logger.debug("cancelled call %s: %s", task_id, protocol.revocation(answer))
        except (redis.RedisError, OSError, asyncio.TimeoutError, ValueError) as exc:
            logger.warning("could not withdraw cancelled call %s: %s", task_id, exc)

    await asyncio.shield(send())


async def _pop(state: redis.asyncio.Redis, key: str, deadline: float) -> str | None:
    while (left := deadline - time.monotonic()) > 0:
        popped = await state.blpop([key], timeout=max(0.001, min(left, connection.BLOCK_SLICE)))
        if popped is not None:
            return str(popped[1])
    return None


@functools.cache
def default_async_client() -> AsyncClient:
    """The async client over :func:`~poolq.default_client`."""
    return AsyncClient(default_client())


async def acall(pool: str, /, *args: Any, **keywords: Any) -> Any:
    """``await`` a call on ``pool`` (see :meth:`AsyncClient.call`)."""
    return await default_async_client().call(pool, *args, **keywords)


def alease(pool: str, timeout: float | None = None, ttl: float | None = None, block: bool = True) -> AsyncLease:
    """Hold an agent of ``pool`` for several awaited calls: ``async with poolq.alease(pool) as agent``."""
    return default_async_client().lease(pool, timeout=timeout, ttl=ttl, block=block)


@overload
def amap(
    pool: str, items: Iterable[Any], *, ordered: Literal[True] = ..., **options: Any
) -> Coroutine[Any, Any, list[Any]]: ...


@overload
def amap(
    pool: str, items: Iterable[Any], *, ordered: Literal[False], **options: Any
) -> AsyncGenerator[Completed, None]: ...


@overload
def amap(
    pool: str, items: Iterable[Any], *, ordered: bool, **options: Any
) -> Coroutine[Any, Any, list[Any]] | AsyncGenerator[Completed, None]: ...


def amap(
    pool: str, items: Iterable[Any], *, ordered: bool = True, **options: Any
) -> Coroutine[Any, Any, list[Any]] | AsyncGenerator[Completed, None]:
    """``await`` one call per item, results in input order; ``ordered=False``: ``async for index, result in``.

    See :meth:`AsyncClient.map`.
    """
    return default_async_client().map(pool, items, ordered=ordered, **options)


async def await_quiet(pool: str, timeout: float | None = None) -> PoolStatus:
    """``await`` the pool's quiescence (see :meth:`AsyncClient.wait_quiet`)."""
    return await default_async_client().wait_quiet(pool, timeout=timeout)


async def astatus(pool: str) -> PoolStatus:
    """``await`` the pool's status (see :meth:`Client.status`)."""
    return await default_async_client().status(pool)


def run_sync(coroutine_fn: Callable[[AsyncClient], Any], client: Client) -> Any:
    """Run an async client operation to completion from synchronous code."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise BlockingInEventLoop("inside a running event loop, use the async form (amap, await_quiet)")
    aclient = AsyncClient(client)

    async def run() -> Any:
        try:
            return await coroutine_fn(aclient)
        finally:
            await aclient.aclose()

    try:
        return asyncio.run(run())
    finally:
        aclient._executor.shutdown(wait=False)


__all__ = ["Arguments", "AsyncClient", "AsyncLease", "Completed", "acall", "alease", "amap", "astatus", "await_quiet"]
