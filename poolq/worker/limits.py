"""Time limits on an agent's work: interrupt it, and end what will not stop.

poolq enforces ``call_timeout`` and ``setup_timeout`` itself, at two levels:

- **interrupt**: in the main thread, SIGALRM raises :class:`CallDeadline` (or
  :class:`SetupDeadline`) inside the agent's code. Both are BaseExceptions,
  so an agent's ``except Exception`` cannot swallow them.
- **end**: a watchdog thread. If the work still runs :data:`HARD_GRACE`
  seconds after its limit (it caught the interruption, or it is stuck in C
  code that signals cannot reach), the watchdog reports the outcome (a
  ``CallTimeout`` reply, a failed setup) and ends the process. A prefork
  worker replaces the child; a ``solo`` node exits for its supervisor to
  restart (its one agent is the node).

Why not Celery's limits: Celery enforces them only in prefork children, its
soft limit raises an ``Exception`` that ``except Exception`` swallows, and it
would count poolq's own work around a call (recycling the agent afterwards)
against the call's limit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..store.protocol import HARD_GRACE

logger = logging.getLogger("poolq.worker")

#: Exit status of a process the watchdog ended.
EXIT_STUCK = 70


class CallDeadline(BaseException):
    """Raised inside an operation that ran past its ``call_timeout``."""


class SetupDeadline(BaseException):
    """Raised inside a ``setup()`` that ran past the pool's ``setup_timeout``."""


class Watchdog:
    """One thread per process that ends the process when armed work overstays.

    ``arm`` and ``disarm`` cost a lock and a notify: cheap enough for every call.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: tuple[float, Callable[[], None], str] | None = None
        self._pid = 0

    def arm(self, seconds: float, on_stuck: Callable[[], None], what: str) -> None:
        """End the process ``seconds`` from now unless :meth:`disarm` comes first (``on_stuck`` runs before)."""
        with self._cond:
            if self._pid != os.getpid():  # threads do not survive a fork
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="poolq-watchdog", daemon=True).start()
            self._armed = (time.monotonic() + seconds, on_stuck, what)
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._armed = None

    def _run(self) -> None:
        with self._cond:
            while True:
                armed = self._armed
                if armed is None:
                    self._cond.wait()
                    continue
                left = armed[0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                break
        _, on_stuck, what = armed
        logger.critical("%s did not stop when interrupted; ending process %d", what, os.getpid())
        try:
            on_stuck()
        except BaseException:
            logger.exception("reporting %s failed", what)
        finally:
            logging.shutdown()
            os._exit(EXIT_STUCK)


watchdog = Watchdog()


@contextlib.contextmanager
def limit(
    seconds: float | None,
    deadline: type[BaseException],
    on_stuck: Callable[[], None],
    what: str,
    hard: bool = True,
) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (main thread only); end the process :data:`HARD_GRACE` s later.

    Parameters:
        seconds: the limit; none (or 0) for no limit.
        deadline: the exception raised inside the block at the limit.
        on_stuck: reports the outcome before the watchdog ends the process.
        what: names the work in the log.
        hard: whether the watchdog may end the process (not where other
            agents share it: the ``threads`` pool).
    """
    if not seconds or seconds <= 0:
        yield
        return
    interrupt = threading.current_thread() is threading.main_thread()
    previous: Any = None
    if interrupt:

        def expire(*_: Any) -> None:
            raise deadline()

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    if hard:
        watchdog.arm(seconds + HARD_GRACE, on_stuck, what)
    try:
        yield
    finally:
        if interrupt:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if hard:
            watchdog.disarm()
