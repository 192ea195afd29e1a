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
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..errors import CallTimeout, CheckoutTimeout, LeaseLost, PoolqTimeout
from ..store import protocol, registry
from . import options

if TYPE_CHECKING:
    from ..config import Config
    from .sync import Client

#: Seconds a lease may go without a call before its agent is taken back.
DEFAULT_LEASE_TTL = 60.0
#: Seconds between checks that a leased agent still lives, while waiting on it.
LIVENESS_SLICE = 1.0


class LeaseCore:
    """What a lease is, apart from how its client waits: options, messages, grant, requests.

    :class:`Lease` waits in threads, :class:`~poolq.client.aio.AsyncLease` in an event loop.
    """

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

    def spec(self) -> Any:
        """The lease's request, as a call to send (its calls carry their own limits)."""
        from .sync import CallSpec

        return CallSpec(pool=self.pool, args=(), kwargs={}, op=None, timeout=self.timeout, call_timeout=None)

    def headers(self) -> dict[str, Any]:
        return {protocol.HEADER_LEASE: self.id, protocol.HEADER_LEASE_TTL: self.ttl}

    def granted(self, grant: str) -> None:
        """Take the agent's first answer: its grant, or why it could not serve (raised)."""
        document = json.loads(grant)
        if "ended" in document:
            raise protocol.error_from({"kind": "unavailable", "type": "", "message": document.get("message", "")})
        if "granted" not in document:
            protocol.result_of(document)  # the worker's error reply: raises it
        self.agent_id, self.agent_name = document["granted"], document["name"]
        self._open = True

    def request(
        self, args: tuple[Any, ...], op: str | None, call_timeout: float | None, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """The next request of this lease, checked at the boundary.

        Raises:
            LeaseLost, InvalidOption, InvalidPayload
        """
        if not self._open:
            raise LeaseLost(f"lease {self.id} on {self.pool.name!r} is not open")
        op = options.operation(op)
        limit = options.seconds("call_timeout", call_timeout, self.pool.call_timeout)
        protocol.check_arguments(self.pool.name, args, kwargs, self.pool.max_payload_bytes)
        self._seq += 1
        return {"seq": self._seq, "op": op, "args": list(args), "kwargs": kwargs, "call_timeout": limit}

    def reply(self, raw: str) -> Any:
        """The result of a request's reply (its error raised; the lease closed when it ended)."""
        document = json.loads(raw)
        if "ended" in document:
            self._open = False
            raise LeaseLost(f"lease {self.id} on {self.pool.name!r} ended: {document['ended']}")
        if document.get("error", {}).get("kind") == "call_timeout":
            self._open = False  # the agent ends the lease and is recycled
        return protocol.result_of(document)

    def is_current(self, raw: str) -> bool:
        """Whether a reply answers the latest request (not a late one to a request that timed out)."""
        return bool(json.loads(raw).get("seq", self._seq) == self._seq)

    def release_message(self, broken: bool) -> str | None:
        """The release request, once (None when the lease is not open)."""
        if not self._open:
            return None
        self._open = False
        return json.dumps({"release": True, "broken": broken})


class Lease(LeaseCore):
    """One agent held for a client. Use it as a context manager, or acquire() / release()."""

    def __init__(self, client: Client, pool: str, timeout: float | None, ttl: float | None, block: bool) -> None:
        super().__init__(client.config, pool, timeout, ttl, block)
        self.client = client

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release(broken=isinstance(exc, PoolqTimeout))

    def acquire(self) -> Lease:
        """Wait up to ``timeout`` for an agent of the pool to take the lease.

        Raises:
            PoolExhausted: ``block=False`` and no agent is free.
            CheckoutTimeout: no agent took the lease within ``timeout``.
            AgentUnavailable: the agent that took it could not be set up.
        """
        client = self.client
        client.check_open(self.pool)
        client.check_capacity(self.pool, block=self.block)
        task_id, replies = str(uuid.uuid4()), protocol.lease_replies_key(self.id)
        client.send(self.spec(), task_id, replies, headers=self.headers())
        with client.translate_errors():
            grant = client.scripts.pop(replies, time.monotonic() + self.timeout)
            if grant is None:
                if client.inspect(task_id, replies).given_up:
                    raise CheckoutTimeout(
                        f"no agent of pool {self.pool.name!r} took the lease within {self.timeout:g}s"
                    )
                grant = client.scripts.pop(replies, time.monotonic() + protocol.BLOCK_SLICE)
        if grant is None:
            raise CheckoutTimeout(f"the agent that took the lease on {self.pool.name!r} never answered")
        self.granted(grant)
        return self

    def call(
        self,
        *args: Any,
        op: str | None = None,
        call_timeout: float | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **keywords: Any,
    ) -> Any:
        """Run ``op`` (default ``handle``) on the leased agent and return its result.

        Raises:
            LeaseLost: the lease ended (released, expired, timed out, or its agent died).
            CallTimeout: the agent did not finish within ``call_timeout`` (the lease ends).
            AgentError, UnknownOperation, InvalidArguments, InvalidPayload, InvalidOption.
        """
        request = self.request(args, op, call_timeout, options.keywords(keywords, kwargs))
        with self.client.translate_errors():
            raw = self._exchange(json.dumps(request), request["call_timeout"] + protocol.CALL_GRACE)
        return self.reply(raw)

    def release(self, broken: bool = False) -> None:
        """Give the agent back: reset, or recycled when ``broken``. Idempotent."""
        message = self.release_message(broken)
        if message is not None:
            with self.client.translate_errors():
                self.client.state.rpush(protocol.lease_requests_key(self.id), message)

    def _exchange(self, request: str, seconds: float) -> str:
        """Send one request and wait for its reply, watching that the agent lives."""
        state = self.client.state
        requests, replies = protocol.lease_requests_key(self.id), protocol.lease_replies_key(self.id)
        deadline = time.monotonic() + seconds
        pipe = state.pipeline(transaction=False)
        pipe.rpush(requests, request)
        pipe.expire(requests, int(self.ttl) + protocol.REPLY_TTL)
        # The first wait rides in the same round trip as the request.
        pipe.blpop([replies], timeout=min(seconds, LIVENESS_SLICE))
        popped = pipe.execute()[-1]
        while True:
            if popped is not None:
                if self.is_current(str(popped[1])):
                    return str(popped[1])
                popped = None  # a late reply to an earlier call that timed out
                continue
            if not registry.is_alive(state, self.agent_id):
                self._open = False
                raise LeaseLost(f"the agent {self.agent_name} of lease {self.id} died")
            left = deadline - time.monotonic()
            if left <= 0:
                self._open = False
                raise CallTimeout(f"the leased agent {self.agent_name} did not answer within {seconds:g}s")
            popped = state.blpop([replies], timeout=min(left, LIVENESS_SLICE))
