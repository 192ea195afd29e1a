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
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import redis
import redis.asyncio

from . import protocol
from .client import Client, default_client
from .errors import (
    BrokerUnavailable,
    CallTimeout,
    CheckoutTimeout,
    LeaseLost,
    PoolqError,
    PoolqTimeout,
)
from .lease import DEFAULT_LEASE_TTL, LIVENESS_SLICE
from .status import PoolStatus

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
        try:
            while self.pending:
                try:
                    popped = await self.state.blpop([self.key], timeout=protocol.BLOCK_SLICE)
                    if popped is None:
                        continue
                    batch = [popped[1], *(await self.state.lpop(self.key, DRAIN_BATCH) or [])]
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    self._fail_all(BrokerUnavailable(f"cannot reach the state Redis: {exc}"))
                    return
                for raw in batch:
                    document = json.loads(raw)
                    future = self.pending.get(document.get("id", ""))
                    if future is not None and not future.done():
                        future.set_result(document)
        finally:
            self.reader = None

    def _fail_all(self, exc: BaseException) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(exc)


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
        **kwargs: Any,
    ) -> Any:
        """``await`` a call: the parameters, result and errors of :meth:`Client.call`."""
        config, timeout, call_timeout = self.client.admit(pool, args, kwargs, timeout, call_timeout)
        if not block or config.max_waiting is not None:
            await self._in_thread(self.client.check_capacity, config, block)
        mailbox = self._mailbox()
        task_id = str(uuid.uuid4())
        reply = mailbox.expect(task_id)
        try:
            await self._in_thread(
                self.client.send, config, args, kwargs, op, timeout, call_timeout, mailbox.key, task_id
            )
            try:
                document = await asyncio.wait_for(asyncio.shield(reply), timeout)
            except asyncio.TimeoutError:
                if await self._give_up(mailbox, task_id):
                    raise CheckoutTimeout(
                        f"no agent of pool {pool!r} took the call within {timeout:g}s; it will not run"
                    ) from None
                try:
                    document = await asyncio.wait_for(reply, call_timeout + protocol.CALL_GRACE)
                except asyncio.TimeoutError:
                    raise CallTimeout(
                        f"the agent of pool {pool!r} did not finish the call within {call_timeout:g}s"
                    ) from None
        finally:
            mailbox.pending.pop(task_id, None)
        return protocol.result_of(document)

    async def _give_up(self, mailbox: _Mailbox, task_id: str) -> bool:
        claimed = await mailbox.state.eval(protocol.EXPIRE_SCRIPT, 1, protocol.claim_key(task_id), protocol.CLAIM_TTL)
        return bool(claimed)

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


class AsyncLease:
    """An agent held for several awaited calls; ``async with client.lease(pool) as agent``."""

    def __init__(self, aclient: AsyncClient, pool: str, timeout: float | None, ttl: float | None, block: bool) -> None:
        self.aclient = aclient
        self.pool = aclient.client.config.pool(pool)
        self.timeout = self.pool.timeout if timeout is None else timeout
        self.ttl = DEFAULT_LEASE_TTL if ttl is None else ttl
        self.block = block
        self.id = str(uuid.uuid4())
        self.agent_id = ""
        self.agent_name = ""
        self._seq = 0
        self._open = False

    async def __aenter__(self) -> AsyncLease:
        return await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release(broken=isinstance(exc, PoolqTimeout))

    async def acquire(self) -> AsyncLease:
        """Wait for an agent to take the lease (errors of :meth:`Lease.acquire`)."""
        client = self.aclient.client
        if not self.block or self.pool.max_waiting is not None:
            await self.aclient._in_thread(client.check_capacity, self.pool, self.block)
        replies = protocol.lease_replies_key(self.id)
        headers = {protocol.HEADER_LEASE: self.id, protocol.HEADER_LEASE_TTL: self.ttl}
        task_id = await self.aclient._in_thread(
            functools.partial(client.send, self.pool, (), {}, None, self.timeout, None, replies, headers=headers)
        )
        mailbox = self.aclient._mailbox()
        grant = await _pop(mailbox.state, replies, self.timeout)
        if grant is None:
            if await self.aclient._give_up(mailbox, task_id):
                raise CheckoutTimeout(f"no agent of pool {self.pool.name!r} took the lease within {self.timeout:g}s")
            grant = await _pop(mailbox.state, replies, protocol.BLOCK_SLICE)
        if grant is None:
            raise CheckoutTimeout(f"the agent that took the lease on {self.pool.name!r} never answered")
        document = json.loads(grant)
        if "ended" in document:
            raise protocol.error_from({"kind": "unavailable", "type": "", "message": document.get("message", "")})
        if "granted" not in document:
            protocol.result_of(document)
        self.agent_id, self.agent_name = document["granted"], document["name"]
        self._open = True
        return self

    async def call(self, *args: Any, op: str | None = None, call_timeout: float | None = None, **kwargs: Any) -> Any:
        """``await`` a call on the leased agent (errors of :meth:`Lease.call`)."""
        if not self._open:
            raise LeaseLost(f"lease {self.id} on {self.pool.name!r} is not open")
        self.aclient.client.check_payload(self.pool, args, kwargs)
        call_timeout = self.pool.call_timeout if call_timeout is None else call_timeout
        self._seq += 1
        request = {"seq": self._seq, "op": op, "args": list(args), "kwargs": kwargs, "call_timeout": call_timeout}
        state = self.aclient._mailbox().state
        requests, replies = protocol.lease_requests_key(self.id), protocol.lease_replies_key(self.id)
        async with state.pipeline(transaction=False) as pipe:
            pipe.rpush(requests, json.dumps(request))
            pipe.expire(requests, int(self.ttl) + protocol.REPLY_TTL)
            await pipe.execute()
        deadline = time.monotonic() + call_timeout + protocol.CALL_GRACE
        while True:
            popped = await state.blpop([replies], timeout=min(max(deadline - time.monotonic(), 0.01), LIVENESS_SLICE))
            if popped is not None:
                document = json.loads(popped[1])
                if document.get("seq", self._seq) != self._seq:
                    continue  # a late reply to an earlier call that timed out
                if "ended" in document:
                    self._open = False
                    raise LeaseLost(f"lease {self.id} on {self.pool.name!r} ended: {document['ended']}")
                if document.get("error", {}).get("kind") == "call_timeout":
                    self._open = False
                return protocol.result_of(document)
            if not await state.exists(protocol.agent_key(self.agent_id)):
                self._open = False
                raise LeaseLost(f"the agent {self.agent_name} of lease {self.id} died")
            if time.monotonic() >= deadline:
                self._open = False
                raise CallTimeout(f"the leased agent {self.agent_name} did not answer within {call_timeout:g}s")

    async def release(self, broken: bool = False) -> None:
        """Give the agent back (reset, or recycled when ``broken``). Idempotent."""
        if not self._open:
            return
        self._open = False
        state = self.aclient._mailbox().state
        await state.rpush(protocol.lease_requests_key(self.id), json.dumps({"release": True, "broken": broken}))


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
    **kwargs: Any,
) -> Any:
    """``await`` a call on ``pool`` (see :meth:`AsyncClient.call`)."""
    return await default_async_client().call(
        pool, *args, op=op, timeout=timeout, call_timeout=call_timeout, block=block, **kwargs
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
