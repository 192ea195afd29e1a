"""A handle on a cast's result: read it now or later, here or in another process, by id."""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any

from ..errors import ResultTimeout
from ..store import keys, messages, protocol
from . import options

if TYPE_CHECKING:
    from .sync import Client


class Handle:
    """The result of a :func:`cast`, now or later, here or in another process.

    Example::

        handle = poolq.cast("embed", texts=["hello"])
        later = poolq.Handle(handle.id)        # in another process
        vectors = later.result(timeout=30)

    Its result stays readable by id for ``result_expires`` seconds (``[poolq]``
    in the configuration, a day by default), and raises the same typed errors
    as :func:`call`. :meth:`revoke` cancels the call.
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
        from .sync import default_client

        return self._client or default_client()

    @property
    def state(self) -> str:
        """The state of the call: PENDING (queued), STARTED (an agent runs it), SUCCESS or FAILURE."""
        client = self.client
        with client.translate_errors():
            stored = client.state.get(keys.result(self.id))
            if stored is not None:
                return "SUCCESS" if "ok" in json.loads(stored) else "FAILURE"
            owner = client.state.hget(keys.claim(self.id), "owner")
        if owner in (protocol.EXPIRED, protocol.CANCELLED):
            return "FAILURE"
        return "PENDING" if owner is None else "STARTED"

    def ready(self) -> bool:
        """Whether the call has finished (successfully or not)."""
        client = self.client
        with client.translate_errors():
            return bool(client.state.exists(keys.result(self.id)))

    def revoke(self) -> protocol.Revocation:
        """Cancel the call, from any process: what became of it.

        - ``"withdrawn"``: no agent had taken it; it will never run.
        - ``"interrupting"``: an agent runs it; it is asked to stop (an agent
          that polls :meth:`poolq.Agent.cancelled` returns early, any other
          finishes its operation) and ends in ``CallCancelled`` whatever it
          returns.
        - ``"finished"``: it had ended; its result stays as it was.

        Either way but the last, :meth:`result` raises
        :class:`~poolq.errors.CallCancelled`. Revoking again says the same.
        The cancel and the call's own claim and finish are one Redis script
        each on the call's claim, so whichever comes first decides.

        Raises:
            BrokerUnavailable
        """
        client = self.client
        with client.translate_errors():
            return protocol.cancel(
                client.scripts,
                self.id,
                reply_to=keys.reply(self.id),
                result=keys.result(self.id),
                result_ttl=client.config.project.result_expires,
            )

    def result(self, timeout: float | None = None) -> Any:
        """Wait up to ``timeout`` seconds (default: forever) and return the result.

        Raises:
            ResultTimeout: the call has not finished within ``timeout``.
            CallCancelled: the call was revoked (see :meth:`revoke`).
            CheckoutTimeout, CallTimeout, AgentError, AgentCrashed, ...: as :meth:`Client.call`.
        """
        client = self.client
        timeout = options.seconds("timeout", timeout)
        give_up_at = self._deadline
        until = math.inf if timeout is None else time.monotonic() + timeout
        key, notify = keys.result(self.id), keys.reply(self.id)
        with client.translate_errors():
            while True:
                stored = client.scripts.command("GET", key)
                if stored is not None:
                    return messages.decode_reply(str(stored))
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
                    return messages.decode_reply(reply)
