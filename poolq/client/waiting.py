"""How long a caller waits for its call, and what it raises when it stops: no I/O here.

A caller waits for its reply in steps. The first ends at ``timeout`` (the
call's deadline for an agent to take it). Each later one ends at a time this
module computes from the call's claim, read when the previous step ended:

- nobody held the call, so the caller's give-up won: :class:`CheckoutTimeout`,
  and the call never runs;
- an agent holds it (a new delivery since the caller last looked): wait
  ``call_timeout`` + :data:`~poolq.store.protocol.CALL_GRACE` more;
- the same agent still holds it past that: :class:`CallTimeout` (the worker
  interrupts the agent at ``call_timeout`` and kills it at
  ``call_timeout`` + :data:`~poolq.store.protocol.HARD_GRACE`, so its own reply
  normally comes first);
- its agent died: the broker gives the call to another agent (redelivery),
  so wait ``redelivery`` seconds for that delivery to show;
- the call is done but no reply came: the reply was lost with the state
  Redis (:class:`BrokerUnavailable`);
- somebody withdrew the call (``Handle(id).revoke()``): :class:`CallCancelled`.

So a call that no agent dies on is answered or raises within
``timeout + call_timeout + CALL_GRACE``; each delivery lost to a dying agent
adds at most ``redelivery + call_timeout + CALL_GRACE``, and there are at most
``max_deliveries`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BrokerUnavailable, CallCancelled, CallTimeout, CheckoutTimeout, PoolqError
from ..store.protocol import CALL_GRACE, CANCELLED, DONE, ClaimView

#: Seconds a caller waits for the reply of a call whose claim says it is done.
REPLY_SLACK = 1.0


@dataclass
class CallWait:
    """The waiting policy of one call; :meth:`next_deadline` after each step that ended without a reply.

    Times are the caller's monotonic clock.
    """

    pool: str
    timeout: float
    call_timeout: float
    max_deliveries: int
    redelivery: float
    started: float
    what: str = "call"
    _attempt: int = 0
    _agent_died_at: float | None = None
    _done_seen: bool = False
    cap: float = field(init=False)

    def __post_init__(self) -> None:
        per_delivery = self.call_timeout + CALL_GRACE + self.redelivery
        self.cap = self.started + self.timeout + self.max_deliveries * per_delivery

    @property
    def first_deadline(self) -> float:
        """When the caller first looks at the claim: at the end of ``timeout``."""
        return self.started + self.timeout

    def next_deadline(self, now: float, claim: ClaimView) -> float:
        """When to look again, given the claim read at ``now``.

        Raises:
            CheckoutTimeout, CallTimeout, CallCancelled, BrokerUnavailable: the caller stops waiting.
        """
        if claim.owner == CANCELLED:
            raise CallCancelled(f"the {self.what} on pool {self.pool!r} was cancelled before an agent took it")
        if claim.given_up:
            raise CheckoutTimeout(
                f"no agent of pool {self.pool!r} took the {self.what} within {self.timeout:g}s; it will not run"
            )
        if claim.owner == DONE:
            if self._done_seen:
                raise BrokerUnavailable(
                    f"the {self.what} on pool {self.pool!r} finished but its reply was lost "
                    "(was the state Redis restarted without persistence?)"
                )
            self._done_seen = True
            return now + REPLY_SLACK
        if now >= self.cap:
            raise self._timed_out()
        if claim.attempts > self._attempt:
            # A delivery the caller has not seen yet runs: it gets its full call_timeout.
            self._attempt, self._agent_died_at = claim.attempts, None
            return min(now + self.call_timeout + CALL_GRACE, self.cap)
        if claim.alive:
            raise self._timed_out()
        if self._agent_died_at is None:
            self._agent_died_at = now
            return min(now + self.redelivery, self.cap)
        raise CallTimeout(
            f"the agent running the {self.what} on pool {self.pool!r} died and the call was not "
            f"delivered to another within {self.redelivery:g}s"
        )

    def _timed_out(self) -> PoolqError:
        return CallTimeout(
            f"the agent of pool {self.pool!r} did not finish the {self.what} within {self.call_timeout:g}s"
        )
