"""A deadline for one operation, by SIGALRM, where Celery enforces none.

Celery enforces ``soft_time_limit`` only in prefork children (its parent
signals them). A ``solo`` worker runs the call in its main thread, and a lease
runs many calls inside one task: there poolq arms the alarm itself.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class CallDeadline(BaseException):
    """Raised inside an operation that ran past its call_timeout.

    A BaseException, so an agent's ``except Exception`` cannot swallow it.
    """


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Interrupt the block after ``seconds``; no deadline off the main thread or without seconds."""
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(*_: Any) -> None:
        raise CallDeadline()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
