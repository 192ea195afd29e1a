"""asyncio: ``await poolq.acall(...)``, ``async with poolq.alease(...)``, ``poolq.amap``.

No thread waits for a reply. Every call made from one event loop names the
same Redis list (its mailbox) as its reply list, and one task per loop pops
replies off it in batches and resolves the callers' futures by call id, so a
thousand calls in flight cost one connection and one task. Sending a call
goes through a few threads (kombu's publish is synchronous), never one per
waiting call.

Example::

    async def handler(text: str) -> dict:
        return await poolq.acall("sentiment", text=text, timeout=2)
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import redis
import redis.asyncio

from ..errors import (
    BrokerUnavailable,
    CallTimeout,
    CheckoutTimeout,
    LeaseLost,
    PoolqError,
    PoolqTimeout,
)
from ..store import protocol
from ..store.status import PoolStatus
from . import options
from .lease import LIVENESS_SLICE, LeaseCore
from .sync import Client, default_client
from .waiting import CallWait

T = TypeVar("T")

#: Threads that publish calls for one async client.
SEND_THREADS = 4
#: Replies taken off the mailbox per round trip once one arrived.
DRAIN_BATCH = 256


class Arguments(NamedTuple):
    """The arguments of one call, for :meth:`AsyncClient.map` items that need several."""

    args: list[Any]
    kwargs: dict[str, Any]


class _Mailbox:
    """The reply list of one client in one event loop, and the task that reads it."""

    def __init__(self, state: redis.asyncio.Redis) -> None:
        self.key = f"poolq:mailbox:{uuid.uuid4()}"
        self.state = state
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.reader: asyncio.Task[None] | None = None

    def expect(self, task_id: str) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[task_id] = future
        if self.reader is None:
            self.reader = asyncio.get_running_loop().create_task(self._read())
        return future

    async def _read(self) -> None:
        delay = 0.05
        try:
            while self.pending:
                try:
                    popped = await self.state.blpop([self.key], timeout=protocol.BLOCK_SLICE)
                    if popped is None:
                        continue
                    batch = [popped[1], *(await self.state.lpop(self.key, DRAIN_BATCH) or [])]
                except (redis.ConnectionError, redis.TimeoutError):
                    # The state Redis is away (a restart): each call keeps waiting
                    # until its own deadline, then finds out for itself.
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, protocol.RECONNECT_BACKOFF_MAX)
                    continue
                delay = 0.05
                for raw in batch:
                    document = json.loads(raw)
                    future = self.pending.get(document.get("id", ""))
                    if future is not None and not future.done():
                        future.set_result(document)
        finally:
            self.reader = None


class AsyncClient:
    """The asyncio face of a :class:`~poolq.Client` (same config, broker and errors)."""

    def __init__(self, client: Client | None = None) -> None:
        self.client = client or default_client()
        self._executor = ThreadPoolExecutor(max_workers=SEND_THREADS, thread_name_prefix="poolq-send")
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()

    def _mailbox(self) -> _Mailbox:
        loop = asyncio.get_running_loop()
        mailbox = self._loops.get(loop)
        if mailbox is None:
            state = redis.asyncio.Redis.from_url(
                self.client.config.state_url,
                decode_responses=True,
                socket_timeout=protocol.SOCKET_TIMEOUT,
                socket_connect_timeout=protocol.SOCKET_TIMEOUT,
                socket_keepalive=True,
            )
            mailbox = self._loops[loop] = _Mailbox(state)
        return mailbox

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    async def call(
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
        """``await`` a call: the parameters, result and errors of :meth:`Client.call`."""
        client = self.client
        spec = client.admit(pool, args, options.keywords(keywords, kwargs), op, timeout, call_timeout, block)
        if not block or spec.pool.max_waiting is not None:
            await self._in_thread(client.check_capacity, spec.pool, block)
        assert spec.timeout is not None and spec.call_timeout is not None
        mailbox = self._mailbox()
        task_id = str(uuid.uuid4())
        reply = mailbox.expect(task_id)
        wait = CallWait(
            pool=spec.pool.name,
            timeout=spec.timeout,
            call_timeout=spec.call_timeout,
            max_deliveries=spec.pool.max_deliveries,
            redelivery=client.config.redelivery_window,
            started=time.monotonic(),
        )
        try:
            await self._in_thread(client.send, spec, task_id, mailbox.key)
            deadline = wait.first_deadline
            while not reply.done():
                # Not wait_for: its TimeoutError would be confused with poolq's (also TimeoutErrors).
                await asyncio.wait([reply], timeout=max(0.0, deadline - time.monotonic()))
                if not reply.done():
                    deadline = wait.next_deadline(time.monotonic(), await self._inspect(mailbox, task_id))
        finally:
            mailbox.pending.pop(task_id, None)
        return protocol.result_of(reply.result())

    async def _inspect(self, mailbox: _Mailbox, task_id: str, reply_to: str = "") -> protocol.ClaimView:
        """:meth:`Client.inspect` on this loop's connection."""
        try:
            owner, *rest = await mailbox.state.eval(*protocol.give_up_command(task_id, reply_to))
            owner = str(owner or "")
            alive = owner not in ("", protocol.EXPIRED, protocol.DONE) and bool(
                await mailbox.state.exists(protocol.agent_key(owner))
            )
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot reach the state Redis: {exc}") from exc
        return protocol.ClaimView(owner=owner, attempts=int(rest[0]) if rest else 0, alive=alive)

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

    async def map(
        self,
        pool: str,
        items: Iterable[Any],
        *,
        op: str | None = None,
        kwargs: bool = False,
        concurrency: int | None = None,
        timeout: float | None = None,
        call_timeout: float | None = None,
        return_exceptions: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[Any]:
        """Call ``pool`` once per item; the results in input order.

        Parameters:
            items: each is the call's single positional argument; with
                ``kwargs=True`` a dict of its keyword arguments; or an
                :class:`Arguments` (positional and keyword arguments).
            concurrency: calls in flight at once (default: twice the pool's
                agents, so each agent has its next call queued).
            return_exceptions: put each failed item's ``PoolqError`` in its
                place instead of raising the first one.
            on_progress: called with (done, total) after every item.
        """
        work = list(items)
        limit = asyncio.Semaphore(concurrency or await self._default_concurrency(pool))
        results: list[Any] = [None] * len(work)
        done = 0

        async def one(index: int, item: Any) -> None:
            nonlocal done
            if isinstance(item, Arguments):
                args, keywords = item
            else:
                args, keywords = ([], item) if kwargs else ([item], {})
            async with limit:
                try:
                    results[index] = await self.call(
                        pool, *args, op=op, timeout=timeout, call_timeout=call_timeout, **keywords
                    )
                except PoolqError as exc:
                    if not return_exceptions:
                        raise
                    results[index] = exc
                finally:
                    done += 1
                    if on_progress is not None:
                        on_progress(done, len(work))

        await asyncio.gather(*(one(i, item) for i, item in enumerate(work)))
        return results

    async def _default_concurrency(self, pool: str) -> int:
        status = await self.status(pool)
        config = self.client.config.pool(pool)
        agents = sum(n.size + n.max_overflow for n in status.nodes) or config.concurrency
        return max(2, 2 * agents)

    async def drain(self, pool: str, timeout: float | None = None, poll: float = 0.1) -> PoolStatus:
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
    """An agent held for several awaited calls; ``async with client.lease(pool) as agent``."""

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
        client = self.aclient.client
        client.check_open(self.pool)
        if not self.block or self.pool.max_waiting is not None:
            await self.aclient._in_thread(client.check_capacity, self.pool, self.block)
        task_id, replies = str(uuid.uuid4()), protocol.lease_replies_key(self.id)
        await self.aclient._in_thread(
            functools.partial(client.send, self.spec(), task_id, replies, headers=self.headers())
        )
        mailbox = self.aclient._mailbox()
        grant = await _pop(mailbox.state, replies, self.timeout)
        if grant is None:
            if (await self.aclient._inspect(mailbox, task_id, replies)).given_up:
                raise CheckoutTimeout(f"no agent of pool {self.pool.name!r} took the lease within {self.timeout:g}s")
            grant = await _pop(mailbox.state, replies, protocol.BLOCK_SLICE)
        if grant is None:
            raise CheckoutTimeout(f"the agent that took the lease on {self.pool.name!r} never answered")
        self.granted(grant)
        return self

    async def call(
        self,
        *args: Any,
        op: str | None = None,
        call_timeout: float | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **keywords: Any,
    ) -> Any:
        """``await`` a call on the leased agent (errors of :meth:`Lease.call`)."""
        request = self.request(args, op, call_timeout, options.keywords(keywords, kwargs))
        state = self.aclient._mailbox().state
        requests, replies = protocol.lease_requests_key(self.id), protocol.lease_replies_key(self.id)
        try:
            async with state.pipeline(transaction=False) as pipe:
                pipe.rpush(requests, json.dumps(request))
                pipe.expire(requests, int(self.ttl) + protocol.REPLY_TTL)
                await pipe.execute()
            deadline = time.monotonic() + request["call_timeout"] + protocol.CALL_GRACE
            while True:
                left = max(deadline - time.monotonic(), 0.01)
                popped = await state.blpop([replies], timeout=min(left, LIVENESS_SLICE))
                if popped is not None:
                    if not self.is_current(str(popped[1])):
                        continue  # a late reply to an earlier call that timed out
                    return self.reply(str(popped[1]))
                if not await state.exists(protocol.agent_key(self.agent_id)):
                    self._open = False
                    raise LeaseLost(f"the agent {self.agent_name} of lease {self.id} died")
                if time.monotonic() >= deadline:
                    self._open = False
                    raise CallTimeout(
                        f"the leased agent {self.agent_name} did not answer within {request['call_timeout']:g}s"
                    )
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot reach the state Redis: {exc}") from exc

    async def release(self, broken: bool = False) -> None:
        """Give the agent back (reset, or recycled when ``broken``). Idempotent."""
        message = self.release_message(broken)
        if message is not None:
            state = self.aclient._mailbox().state
            try:
                await state.rpush(protocol.lease_requests_key(self.id), message)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise BrokerUnavailable(f"cannot reach the state Redis: {exc}") from exc


async def _pop(state: redis.asyncio.Redis, key: str, seconds: float) -> str | None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        popped = await state.blpop([key], timeout=min(left, protocol.BLOCK_SLICE))
        if popped is not None:
            return str(popped[1])
    return None


@functools.cache
def default_async_client() -> AsyncClient:
    """The async client over :func:`~poolq.default_client`."""
    return AsyncClient(default_client())


async def acall(
    pool: str,
    *args: Any,
    op: str | None = None,
    timeout: float | None = None,
    call_timeout: float | None = None,
    block: bool = True,
    kwargs: Mapping[str, Any] | None = None,
    **keywords: Any,
) -> Any:
    """``await`` a call on ``pool`` (see :meth:`AsyncClient.call`)."""
    return await default_async_client().call(
        pool, *args, op=op, timeout=timeout, call_timeout=call_timeout, block=block, kwargs=kwargs, **keywords
    )


def alease(pool: str, timeout: float | None = None, ttl: float | None = None, block: bool = True) -> AsyncLease:
    """Hold an agent of ``pool`` for several awaited calls: ``async with poolq.alease(pool) as agent``."""
    return default_async_client().lease(pool, timeout=timeout, ttl=ttl, block=block)


async def amap(pool: str, items: Iterable[Any], **options: Any) -> list[Any]:
    """``await`` one call per item, results in input order (see :meth:`AsyncClient.map`)."""
    return await default_async_client().map(pool, items, **options)


async def adrain(pool: str, timeout: float | None = None) -> PoolStatus:
    """``await`` the pool's quiescence (see :meth:`AsyncClient.drain`)."""
    return await default_async_client().drain(pool, timeout=timeout)


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
        raise RuntimeError("poolq: inside a running event loop, use the async form (amap, adrain)")
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


__all__ = ["Arguments", "AsyncClient", "AsyncLease", "acall", "adrain", "alease", "amap", "default_async_client"]
