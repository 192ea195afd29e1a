"""Leases: hold one agent for several calls (with_agent / transaction / checkout + checkin).

::

    with poolq.lease("chat", timeout=5, ttl=60) as agent:
        agent.call(op="start", user="ada")
        answer = agent.call("What did I just say?")

Every call of a lease runs on the same agent, and nobody else gets that agent
meanwhile. Leaving the block releases it: ``reset()`` runs before it serves
anybody else. ``release(broken=True)``, a call that timed out, or a client that
vanished (nothing sent for ``ttl`` seconds) sends the agent to recycling
instead. Calls travel on the lease's own Redis lists, never through the result
backend.

What a lease is and does lives in :class:`LeaseCore` (steps of
:mod:`poolq.client.core`); :class:`Lease` runs them in threads,
:class:`~poolq.client.aio.AsyncLease` in an event loop.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..errors import CallTimeout, CheckoutTimeout, InvalidOption, LeaseLost, PoolqTimeout
from ..store import connection, keys, messages, protocol
from . import core, options
from .core import Alive, Inspect, Pop, Push, Send, Steps

if TYPE_CHECKING:
    from ..config import Config
    from .sync import Client

#: Seconds a lease may go without a call before its agent is taken back.
DEFAULT_LEASE_TTL = 60.0
#: Seconds between checks that a leased agent still lives, while waiting on it.
LIVENESS_SLICE = 1.0


class LeaseCore:
    """A lease's options, messages and steps (acquire, call, release), whatever waits on them."""

    def __init__(self, config: Config, pool: str, timeout: float | None, ttl: float | None, block: bool) -> None:
        self.pool = config.pool(options.pool_name(pool))
        self.timeout = options.seconds("timeout", timeout, self.pool.timeout) or self.pool.timeout
        self.ttl = options.seconds("ttl", ttl, DEFAULT_LEASE_TTL) or DEFAULT_LEASE_TTL
        self.block = options.flag("block", block)
        self.id = str(uuid.uuid4())
        self.agent_id = ""
        self.agent_name = ""
        self._seq = 0
        self._open = False

    @property
    def requests(self) -> str:
        return keys.lease_requests(self.id)

    @property
    def replies(self) -> str:
        return keys.lease_replies(self.id)

    def acquire_steps(self, gate: core.Gate) -> Steps[None]:
        """Wait up to ``timeout`` for an agent of the pool to take the lease.

        Raises:
            PoolClosed, PoolDegraded, PoolExhausted: before anything is sent.
            CheckoutTimeout: no agent took the lease within ``timeout``.
            AgentUnavailable: the agent that took it could not be set up.
        """
        spec = core.CallSpec(self.pool, (), {}, None, self.timeout, None, self.block)
        yield from core.admission(gate, spec)
        task_id = str(uuid.uuid4())
        yield Send(
            spec, task_id, self.replies, headers={protocol.HEADER_LEASE: self.id, protocol.HEADER_LEASE_TTL: self.ttl}
        )
        grant = yield Pop(self.replies, time.monotonic() + self.timeout)
        if grant is None:
            if (yield Inspect(task_id, self.replies)).given_up:
                raise CheckoutTimeout(f"no agent of pool {self.pool.name!r} took the lease within {self.timeout:g}s")
            grant = yield Pop(self.replies, time.monotonic() + connection.BLOCK_SLICE)
        if grant is None:
            # An agent holds it but was slow to grant: have it give the lease back at once, not after ttl.
            yield Push(self.requests, messages.LeaseRequest(release=True).encode(), self._list_ttl)
            raise CheckoutTimeout(f"the agent that took the lease on {self.pool.name!r} never answered")
        self.agent_id, self.agent_name = messages.read_lease_grant(grant)
        self._open = True

    def call_steps(self, args: tuple[Any, ...], keywords: Mapping[str, Any]) -> Steps[Any]:
        """Run an operation on the leased agent (``op`` and ``call_timeout`` among ``keywords``).

        Raises:
            LeaseLost: the lease ended (released, expired, timed out, or its agent died).
            CallTimeout: the agent did not finish within ``call_timeout`` (the lease ends).
            CheckoutTimeout: the pool's ``rate_limit`` gave no slot within the lease's ``timeout``;
                the call did not run (the lease goes on).
            AgentError, UnknownOperation, InvalidArguments, InvalidPayload, InvalidOption.
        """
        if not self._open:
            raise LeaseLost(f"lease {self.id} on {self.pool.name!r} is not open")
        chosen, kwargs = options.split(keywords)
        ignored = sorted(set(chosen) - {"op", "call_timeout"})
        if ignored:
            raise InvalidOption(
                f"a lease's call takes op and call_timeout, not {', '.join(ignored)} (options of the lease itself); "
                "pass an agent's own keyword of that name in kwargs={...}"
            )
        limit = options.seconds("call_timeout", chosen.get("call_timeout"), self.pool.call_timeout)
        assert limit is not None
        op = options.operation(chosen.get("op"))
        messages.check_arguments(self.pool.name, args, kwargs, self.pool.max_payload_bytes)
        self._seq += 1
        request = messages.LeaseRequest(self._seq, op, list(args), kwargs, limit, wait=self.timeout)
        yield Push(self.requests, request.encode(), self._list_ttl)
        # In a rate-limited pool the agent may first wait up to the lease's timeout for a slot.
        deadline = time.monotonic() + limit + protocol.CALL_GRACE + (self.timeout if self.pool.rate else 0.0)
        while True:
            raw = yield Pop(self.replies, min(deadline, time.monotonic() + LIVENESS_SLICE))
            if raw is not None:
                answered, result = self._read(raw)
                if answered:
                    return result
            elif not (yield Alive(self.agent_id)):
                self._open = False
                raise LeaseLost(f"the agent {self.agent_name} of lease {self.id} died")
            elif time.monotonic() >= deadline:
                self._open = False
                raise CallTimeout(f"the leased agent {self.agent_name} did not answer within {limit:g}s")

    def release_steps(self, broken: bool) -> Steps[None]:
        """Give the agent back: reset, or recycled when ``broken``. Idempotent."""
        if self._open:
            self._open = False
            yield Push(self.requests, messages.LeaseRequest(release=True, broken=broken).encode(), self._list_ttl)

    @property
    def _list_ttl(self) -> int:
        return int(self.ttl) + protocol.REPLY_TTL

    def _read(self, raw: str) -> tuple[bool, Any]:
        try:
            return messages.read_lease_reply(raw, self._seq, self.id)
        except (LeaseLost, CallTimeout):
            self._open = False  # it ended, or a timed-out call ended it (its agent is recycled)
            raise


class Lease(LeaseCore):
    """One agent held for a client. Use it as a context manager, or acquire() / release()."""

    def __init__(self, client: Client, pool: str, timeout: float | None, ttl: float | None, block: bool) -> None:
        super().__init__(client.config, pool, timeout, ttl, block)
        self.client = client

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release(broken=isinstance(exc, PoolqTimeout))

    def acquire(self) -> Lease:
        """Wait for an agent to take the lease (see :meth:`LeaseCore.acquire_steps`)."""
        self.client.run(self.acquire_steps(self.client.gate))
        return self

    def call(self, *args: Any, **keywords: Any) -> Any:
        """Run ``op`` (default ``handle``) on the leased agent (see :meth:`LeaseCore.call_steps`)."""
        return self.client.run(self.call_steps(args, keywords))

    def release(self, broken: bool = False) -> None:
        """Give the agent back: reset, or recycled when ``broken``. Idempotent."""
        self.client.run(self.release_steps(broken))
