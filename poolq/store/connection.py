"""Connections to the state Redis, and the commands of the call path sent on connections of their own."""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from ..config import redact

T = TypeVar("T")

#: Seconds a state Redis socket may stay silent before the client gives up on it.
SOCKET_TIMEOUT = 10.0
#: Longest single BLPOP, kept below SOCKET_TIMEOUT.
BLOCK_SLICE = 8.0
#: Longest pause between two tries while the state Redis is unreachable.
RECONNECT_BACKOFF_MAX = 1.0

#: Pooled connections of one state client (the call path's own are apart, see Scripts).
MAX_CONNECTIONS = 100


def connect(url: str) -> redis.Redis:
    """A client for the state Redis; it decodes replies to ``str``."""
    # Blocking: a burst of threads (a web server's) waits its turn for a
    # connection instead of failing with "Too many connections" past 100.
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=SOCKET_TIMEOUT,
        decode_responses=True,
        health_check_interval=30,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        socket_keepalive=True,
    )
    return redis.Redis(connection_pool=pool)


#: Longest pause, in seconds, between two tries to reach a store that is not up yet.
WAIT_BACKOFF_MAX = 10.0


def retrying(deadline: float | None, fn: Callable[[], T]) -> T:
    """``fn()``, tried again while the server is unreachable, until ``deadline`` (monotonic; None: once).

    Raises:
        redis.ConnectionError: still unreachable at the deadline.
    """
    delay = 0.05
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError):
            if deadline is None or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, RECONNECT_BACKOFF_MAX)


def wait_reachable(client: redis.Redis, url: str, say: Callable[[str], None]) -> None:
    """Return once ``client``'s server answers; until then try again with backoff (1 s up to 10 s).

    Says so in one line when the server is not up, and in one more when it is.
    A process started before its broker (``honcho start``, compose) waits
    instead of dying, as Celery's own worker does for the broker.
    """
    delay, waited = 1.0, False
    while True:
        try:
            client.ping()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if not waited:
                say(f"the state store {redact(url)} is not reachable ({exc}); retrying until it is")
                waited = True
            time.sleep(delay)
            delay = min(delay * 2, WAIT_BACKOFF_MAX)
            continue
        except redis.ResponseError as exc:
            if "LOADING" not in str(exc):
                raise
            time.sleep(delay)
            continue
        if waited:
            say(f"the state store {redact(url)} is reachable")
        return


class Scripts:
    """The Lua scripts above, and BLPOP: the commands on the call path.

    They are sent and read directly on connections of their own: redis-py's
    generic command path (pool checkout, retry wrapper, health check) costs
    about as much as the network round trip on localhost, and a call makes
    three of these. Connections are shared through a free list, so a web
    server's short-lived request threads reuse them instead of connecting
    per request. A lost connection is reopened and the command sent once more.
    """

    #: Idle connections kept for reuse; more are closed when given back.
    KEEP_IDLE = 64

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._pid = os.getpid()

    def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run one of this module's Lua scripts (loading it into the server if needed)."""
        sha = _sha(script)
        try:
            return self.command("EVALSHA", sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.command("SCRIPT", "LOAD", script)
            return self.command("EVALSHA", sha, len(keys), *keys, *args)

    def run_until(self, deadline: float | None, script: str, keys: list[str], args: list[Any]) -> Any:
        """:meth:`run`, tried again while the server is unreachable, until ``deadline`` (monotonic; None: once).

        Raises:
            redis.ConnectionError: still unreachable at the deadline.
        """
        return retrying(deadline, lambda: self.run(script, keys, args))

    def pop(self, key: str, deadline: float) -> str | None:
        """BLPOP ``key`` until ``deadline`` (monotonic), at most :data:`BLOCK_SLICE` per round trip.

        Rides out a state Redis that is unreachable for a while (a restart):
        the wait goes on until the deadline.

        Raises:
            redis.ConnectionError: the server was unreachable when the deadline came.
        """
        delay = 0.05
        while (left := deadline - time.monotonic()) > 0:
            try:
                popped = self.command("BLPOP", key, _block_seconds(left))
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() + delay >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_BACKOFF_MAX)
                continue
            delay = 0.05
            if popped is not None:
                return str(popped[1])
        return None

    def command(self, *args: Any) -> Any:
        connection = self._take()
        try:
            try:
                connection.send_command(*args)
                reply = connection.read_response()
            except (redis.ConnectionError, redis.TimeoutError):
                connection.disconnect()
                connection.send_command(*args)
                reply = connection.read_response()
        except redis.ResponseError:
            self._give(connection)  # an error reply leaves the connection in step
            raise
        except BaseException:
            # Interrupted mid-command (a timeout, a signal): a reply may still
            # be on its way, so this socket is never reused.
            connection.disconnect()
            raise
        self._give(connection)
        return reply

    def close(self) -> None:
        """Close the idle connections (those in use close when given back)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.disconnect()

    def _take(self) -> Any:
        with self._lock:
            if self._pid != os.getpid():
                # A forked child never uses its parent's sockets.
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        # Made outside the client pool's count (max_connections): these are
        # bounded by the callers in flight, not by that pool.
        return self._pool.connection_class(**self._pool.connection_kwargs)

    def _give(self, connection: Any) -> None:
        with self._lock:
            if len(self._idle) < self.KEEP_IDLE and self._pid == os.getpid():
                self._idle.append(connection)
                return
        connection.disconnect()


def _block_seconds(left: float) -> float:
    # BLPOP takes its timeout in seconds with millisecond precision; 0 would block forever.
    return max(0.001, round(min(left, BLOCK_SLICE), 3))


@functools.cache
def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()
