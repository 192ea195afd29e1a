"""A cancelled call, as the agent that runs it sees it: :meth:`poolq.Agent.cancelled`.

A caller cancels a call with ``Handle.revoke()`` or by cancelling the task
that awaits its ``acall`` (see :func:`poolq.store.protocol.cancel`). A call
still queued is withdrawn and never runs. A running one is only *asked* to
stop: its claim gets a ``cancel`` field, which the agent reads through
``self.cancelled()`` (here) where its operation can stop cleanly, and which
replaces the call's reply when it ends, so its caller gets ``CallCancelled``
whatever the operation returns.

Why poolq never interrupts an operation for a cancel, as it does at
``call_timeout``: an exception thrown into the agent's code lands anywhere (in
a lock, between two halves of an update, inside a library), so the only safe
follow-up is recycling the agent, a new ``setup()``. A cancel comes from a
caller (a web client that hung up), not from a limit the operator set:
letting every disconnect cost a model load would hand any client a way to
keep the pool cold. ``call_timeout`` still bounds an operation that never looks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis

from ..agent import CANCEL_CHECK
from ..store import protocol
from ..store.connection import Scripts

logger = logging.getLogger("poolq.worker")

#: Seconds between two reads of a running call's cancel flag, however often its agent asks.
POLL = 0.1


class CancelCheck:
    """Whether one running call was cancelled: read from its claim at most every :data:`POLL` seconds.

    Once seen, a cancel stays seen. An unreachable state Redis reads as "not
    cancelled" (asked again at the next poll).
    """

    def __init__(self, scripts: Scripts, task_id: str, poll: float = POLL) -> None:
        self._scripts = scripts
        self._task_id = task_id
        self._poll = poll
        self._next_read = 0.0
        self._seen = False

    def __call__(self) -> bool:
        if self._seen:
            return True
        now = time.monotonic()
        if now >= self._next_read:
            self._next_read = now + self._poll
            try:
                self._seen = protocol.cancel_requested(self._scripts, self._task_id)
            except redis.RedisError as exc:
                logger.debug("could not read the cancel flag of call %s: %s", self._task_id, exc)
        return self._seen


@contextlib.contextmanager
def watching(agent: Any, scripts: Scripts, task_id: str) -> Iterator[None]:
    """Let ``agent.cancelled()`` answer for call ``task_id`` while the block runs."""
    setattr(agent, CANCEL_CHECK, CancelCheck(scripts, task_id))
    try:
        yield
    finally:
        setattr(agent, CANCEL_CHECK, None)
