"""Many calls over one list of inputs: ``map`` in input order, or as the calls complete.

:func:`as_completed` is the one loop behind both: it keeps at most
``concurrency`` calls in flight (or done and not yet taken), sends the next
input as each result is taken, and yields :class:`Completed` pairs in the
order the calls finish. :func:`in_order` collects them into a list.
The sync client iterates an unordered map with :func:`iterate`, which runs
the loop on an event loop in a thread of its own, so that replies keep being
read while the caller works on a result.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Collection, Generator, Iterable
from concurrent.futures import Future
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from ..errors import InvalidOption, PoolqError

if TYPE_CHECKING:
    from .aio import AsyncClient

T = TypeVar("T")

#: Marks the end of an iterator (``next(it, _END)``).
_END: Any = object()


class Arguments(NamedTuple):
    """The arguments of one call, for :meth:`AsyncClient.map` items that need several."""

    args: list[Any]
    kwargs: dict[str, Any]


class Completed(NamedTuple):
    """One call of an unordered map, done: the position of its input and its result.

    ``result`` is the call's result or, with ``return_exceptions=True``, the
    :class:`~poolq.PoolqError` it failed with. It unpacks as a pair::

        for index, result in poolq.map("echo", texts, ordered=False):
            print(texts[index], "->", result)
    """

    index: int  # type: ignore[assignment]  # hides tuple.index(), which nobody calls on a pair
    result: Any


async def as_completed(
    aclient: AsyncClient,
    pool: str,
    items: Iterable[Any],
    *,
    op: str | None = None,
    kwargs: bool = False,
    concurrency: int | None = None,
    timeout: float | None = None,
    call_timeout: float | None = None,
    return_exceptions: bool = False,
) -> AsyncGenerator[Completed, None]:
    """Call ``pool`` once per item; yield each :class:`Completed` call as it finishes.

    At most ``concurrency`` calls are in flight or done and not yet taken;
    the next item is read and sent as each result is taken, so ``items`` may
    be a long or endless iterator. One that is not a collection (a file, a
    database cursor) is read in a thread, never blocking the event loop.
    Calls that finish together come in input order.

    When the first failure raises (without ``return_exceptions``) or the
    generator is closed early (``break``, ``aclose()``), the calls still in
    flight are cancelled like any cancelled ``acall``: a queued one is
    withdrawn and never runs, a running one is asked to stop (see
    :meth:`poolq.Agent.cancelled`). No further item is read or sent.
    """
    limit = concurrency or await default_concurrency(aclient, pool)
    if limit < 1:
        raise InvalidOption(f"concurrency must be at least 1 (got {limit})")
    options: dict[str, Any] = {"op": op, "timeout": timeout, "call_timeout": call_timeout}

    async def one(index: int, item: Any) -> Completed:
        if isinstance(item, Arguments):
            args, keywords = item
        else:
            args, keywords = ([], item) if kwargs else ([item], {})
        try:
            return Completed(index, await aclient.call(pool, *args, **options, kwargs=keywords))
        except PoolqError as exc:
            if not return_exceptions:
                raise
            return Completed(index, exc)

    inputs = enumerate(items)
    in_memory = isinstance(items, Collection)
    exhausted = False
    running: dict[asyncio.Task[Completed], int] = {}
    ready: deque[asyncio.Task[Completed]] = deque()
    try:
        while True:
            while not exhausted and len(running) + len(ready) < limit:
                entry = next(inputs, _END) if in_memory else await aclient._in_thread(next, inputs, _END)
                if entry is _END:
                    exhausted = True
                else:
                    running[asyncio.ensure_future(one(*entry))] = entry[0]
            if not ready:
                if not running:
                    return
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                ready.extend(sorted(done, key=running.__getitem__))
                for task in done:
                    del running[task]
            yield ready.popleft().result()
    finally:
        leftover = [*running, *ready]
        for task in leftover:
            task.cancel()
        await asyncio.gather(*leftover, return_exceptions=True)


async def in_order(
    aclient: AsyncClient,
    pool: str,
    items: Iterable[Any],
    *,
    on_progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> list[Any]:
    """The results of :func:`as_completed` in input order; ``on_progress(done, total)`` after each."""
    work = list(items)
    results: list[Any] = [None] * len(work)
    done = 0
    async with aclosing(as_completed(aclient, pool, work, **options)) as completions:
        async for index, result in completions:
            results[index] = result
            done += 1
            if on_progress is not None:
                on_progress(done, len(work))
    return results


async def default_concurrency(aclient: AsyncClient, pool: str) -> int:
    """Twice the pool's agents (overflow included), so that each has its next call queued."""
    status = await aclient.status(pool)
    config = aclient.client.config.pool(pool)
    agents = sum(n.size + n.max_overflow for n in status.nodes) or config.concurrency
    return max(2, 2 * agents)


def iterate(aclient: AsyncClient, stream: AsyncGenerator[T, None]) -> Generator[T, None, None]:
    """Iterate ``stream``, an async generator over ``aclient``, from synchronous code.

    Nothing starts before the first ``next()``. Then the generator runs on an
    event loop in a thread of its own (``poolq-map``), which goes on reading
    replies while the caller works on an item; each ``next()`` takes one
    item. The end of the iteration, an error, ``break`` (or ``close()``)
    closes the generator, the client's connections, the loop and its thread.
    """
    ready: Future[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = Future()
    # A daemon: an iterator left open at interpreter exit must not hold the exit up.
    thread = threading.Thread(target=asyncio.run, args=(_serve(ready),), name="poolq-map", daemon=True)
    thread.start()
    loop, stop = ready.result()
    stepping: asyncio.Task[Any] | None = None

    async def step() -> Any:
        nonlocal stepping
        stepping = asyncio.current_task()
        return await anext(stream, _END)

    async def close() -> None:
        try:
            if stepping is not None and not stepping.done():
                stepping.cancel()  # the caller stopped waiting for it (Ctrl-C)
                await asyncio.wait([stepping])
            await stream.aclose()
            await aclient.aclose()
        finally:
            stop.set()

    try:
        while (item := asyncio.run_coroutine_threadsafe(step(), loop).result()) is not _END:
            yield item
    finally:
        # At interpreter exit the loop's thread may be frozen already: nothing to wait for.
        if not sys.is_finalizing():
            try:
                asyncio.run_coroutine_threadsafe(close(), loop).result()
            finally:
                thread.join()
                # A send under way finishes on its own (about a second at most), then its thread ends.
                aclient._executor.shutdown(wait=False, cancel_futures=True)


async def _serve(ready: Future[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    """Run until told to stop (under :func:`asyncio.run`, which then cleans the loop up)."""
    stop = asyncio.Event()
    ready.set_result((asyncio.get_running_loop(), stop))
    await stop.wait()
