"""The client's core: what a call is, whether it may go, and what happens next. No I/O here.

The sync client (threads) and the async one (asyncio) run the same steps.
They are written once, as generators that yield *effects* (send this call,
wait for that list until then, read the pool's state) and receive each
effect's outcome. Each client has a performer that carries effects out in its
own way of waiting; :func:`run` and :func:`arun` drive the steps::

    spec = admit(config, "echo", ("hi",), {"timeout": 2})    # typed errors, nothing sent
    result = run(call(gate, spec, task_id, reply_to, redelivery), client.perform)
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..config import Config, PoolConfig, RateLimit
from ..errors import PoolClosed, PoolDegraded, PoolExhausted, PoolqError, RateLimited
from ..store import keys, messages, registry
from ..store.status import PoolStatus
from . import options
from .waiting import CallWait

T = TypeVar("T")

#: Seconds a client trusts what it last read of a pool's state (closed, degraded).
GATE_CACHE = 1.0


# -- effects: what the steps ask the client to do ----------------------------


@dataclass(frozen=True)
class ReadPool:
    """Read the pool's counters and flags; outcome: ``dict[str, str]``."""

    pool: str


@dataclass(frozen=True)
class ReadStatus:
    """Read the pool's status; outcome: :class:`~poolq.store.status.PoolStatus`."""

    pool: str


@dataclass(frozen=True)
class Send:
    """Put a call on its pool's queue; its reply goes to ``reply_to`` (and a cast's to ``result``)."""

    spec: CallSpec
    task_id: str
    reply_to: str
    result: str = ""
    headers: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pop:
    """Wait for the next item of a list until ``deadline`` (monotonic); outcome: the item or None.

    ``task_id`` names the reply awaited when the list is shared (an event loop's mailbox).
    """

    key: str
    deadline: float
    task_id: str = ""


@dataclass(frozen=True)
class Inspect:
    """Give a call up unless an agent holds it; outcome: :class:`~poolq.store.protocol.ClaimView`."""

    task_id: str
    reply_to: str = ""
    result: str = ""


@dataclass(frozen=True)
class Push:
    """Append ``value`` to a list that lives ``ttl`` seconds; outcome: None."""

    key: str
    value: str
    ttl: int


@dataclass(frozen=True)
class Alive:
    """Whether an agent's heartbeat is current; outcome: ``bool``."""

    agent_id: str


@dataclass(frozen=True)
class PeekRate:
    """Look at the pool's rate limit without taking a slot; outcome: seconds until one is free (0.0: now)."""

    pool: str
    rate: RateLimit


Effect = ReadPool | ReadStatus | Send | Pop | Inspect | Push | Alive | PeekRate
Steps = Generator[Effect, Any, T]


@dataclass(frozen=True)
class Done:
    value: Any


def advance(steps: Steps[Any], outcome: Any) -> Effect | Done:
    """Hand the last effect's outcome to the steps; the next effect, or :class:`Done`."""
    try:
        return steps.send(outcome)
    except StopIteration as finished:
        return Done(finished.value)


def run(steps: Steps[T], perform: Callable[[Effect], Any]) -> T:
    """Drive ``steps`` to their end, carrying out each effect with ``perform``."""
    effect = advance(steps, None)
    while not isinstance(effect, Done):
        effect = advance(steps, perform(effect))
    return effect.value  # type: ignore[no-any-return]


async def arun(steps: Steps[T], perform: Callable[[Effect], Awaitable[Any]]) -> T:
    """:func:`run`, with an effect performer that is awaited."""
    effect = advance(steps, None)
    while not isinstance(effect, Done):
        effect = advance(steps, await perform(effect))
    return effect.value  # type: ignore[no-any-return]


# -- a call, from its checks to its reply ------------------------------------


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
    block: bool = True


def shown_name(spec: CallSpec, lease: bool = False) -> str:
    """The call's name in Celery's logs and events (Flower's task name): ``poolq.<pool>.<op>``.

    ``op`` is ``handle`` when none was given, ``lease`` for the message that
    takes a lease. It travels as Celery's ``shadow``: the message still names
    the pool's task, which the worker looks up and runs.
    """
    return f"{spec.pool.task_name}.{'lease' if lease else spec.op or 'handle'}"


def admit(
    config: Config, pool: str, args: tuple[Any, ...], keywords: Mapping[str, Any], queue_forever: bool = False
) -> CallSpec:
    """Check a call at the boundary: its pool, its options (taken out of ``keywords``), its payload.

    ``timeout`` defaults to the pool's, or to none with ``queue_forever`` (a cast).

    Raises:
        UnknownPool, InvalidOption, InvalidPayload
    """
    config_pool = config.pool(options.pool_name(pool))
    chosen, kwargs = options.split(keywords)
    spec = CallSpec(
        pool=config_pool,
        args=args,
        kwargs=kwargs,
        op=options.operation(chosen.get("op")),
        timeout=options.seconds("timeout", chosen.get("timeout"), None if queue_forever else config_pool.timeout),
        call_timeout=options.seconds("call_timeout", chosen.get("call_timeout"), config_pool.call_timeout),
        block=options.flag("block", chosen.get("block", True)),
    )
    messages.check_arguments(config_pool.name, args, kwargs, config_pool.max_payload_bytes)
    return spec


class Gate:
    """Whether calls to a pool may be sent: a closed or degraded pool refuses them at once.

    The pool's state is read at most once per :data:`GATE_CACHE` seconds,
    so it costs the call path a round trip once a second, not per call.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, tuple[type[PoolqError], str] | None]] = {}

    def check(self, pool: PoolConfig) -> Steps[None]:
        """Raises PoolClosed or PoolDegraded when the pool refuses calls."""
        now = time.monotonic()
        checked_at, refusal = self._seen.get(pool.name, (-math.inf, None))
        if now - checked_at >= GATE_CACHE:
            refusal = _refusal(pool.name, (yield ReadPool(pool.name)), time.time())
            self._seen[pool.name] = (now, refusal)
        if refusal is not None:
            cls, message = refusal
            raise cls(message)

    def forget(self, pool: str) -> None:
        """Read the pool's state again before the next call."""
        self._seen.pop(pool, None)


def _refusal(pool: str, stats: Mapping[str, str], now: float) -> tuple[type[PoolqError], str] | None:
    if stats.get("skipped"):
        return PoolClosed, f"pool {pool!r} is not running: its worker skipped it ({stats['skipped']})"
    if stats.get("closed"):
        return PoolClosed, f"pool {pool!r} was stopped on purpose ({stats['closed']}); start a node to reopen it"
    if registry.breaker_open(stats, now):
        return PoolDegraded, f"pool {pool!r} is degraded, its agents fail to set up: {stats.get('breaker_error', '')}"
    return None


def admission(gate: Gate, spec: CallSpec) -> Steps[None]:
    """The checks before sending that need the pool's state: open, and room when the caller asked.

    Raises:
        PoolClosed, PoolDegraded, PoolExhausted
    """
    yield from gate.check(spec.pool)
    if not spec.block or spec.pool.max_waiting is not None:
        refuse_if_full(spec.pool, (yield ReadStatus(spec.pool.name)), spec.block)


def refuse_if_full(pool: PoolConfig, status: PoolStatus, block: bool) -> None:
    """Raise PoolExhausted when the pool cannot take a call now (``block=False``, or ``max_waiting`` reached)."""
    if pool.max_waiting is not None and status.waiting >= pool.max_waiting:
        raise PoolExhausted(f"pool {pool.name!r} has {status.waiting} calls waiting (max_waiting {pool.max_waiting})")
    if not block and status.available == 0 and not status.can_grow:
        raise PoolExhausted(f"no agent of pool {pool.name!r} is free and its overflow is spent")


def refuse_if_rate_limited(spec: CallSpec) -> Steps[None]:
    """With ``block=False`` in a rate-limited pool, look whether a slot is free now (taking none).

    A call that may wait needs no look: its worker waits for a slot within its ``timeout``.

    Raises:
        RateLimited: the pool's window is full.
    """
    rate = spec.pool.rate
    if spec.block or rate is None:
        return
    wait = yield PeekRate(spec.pool.name, rate)
    if wait > 0:
        raise RateLimited(f"pool {spec.pool.name!r} is at its rate_limit ({rate}); a slot frees in {wait:.3g}s")


def call(gate: Gate, spec: CallSpec, task_id: str, reply_to: str, redelivery: float) -> Steps[Any]:
    """A call from its admission to its result (see :mod:`poolq.client.waiting` for how long it waits).

    Raises:
        every error of :meth:`poolq.Client.call`
    """
    assert spec.timeout is not None and spec.call_timeout is not None
    yield from admission(gate, spec)
    yield from refuse_if_rate_limited(spec)
    yield Send(spec, task_id, reply_to)
    wait = CallWait(
        pool=spec.pool.name,
        timeout=spec.timeout,
        call_timeout=spec.call_timeout,
        max_deliveries=spec.pool.max_deliveries,
        redelivery=redelivery,
        started=time.monotonic(),
    )
    deadline = wait.first_deadline
    while True:
        reply = yield Pop(reply_to, deadline, task_id)
        if reply is not None:
            return messages.decode_reply(reply)
        deadline = wait.next_deadline(time.monotonic(), (yield Inspect(task_id, reply_to)))


def cast(gate: Gate, spec: CallSpec, task_id: str) -> Steps[None]:
    """A cast: admitted and sent; its reply is kept under its id (see :class:`poolq.Handle`)."""
    yield from admission(gate, spec)
    yield from refuse_if_rate_limited(spec)
    yield Send(spec, task_id, keys.reply(task_id), result=keys.result(task_id))
