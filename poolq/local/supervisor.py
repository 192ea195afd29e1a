"""The foreground supervisor behind ``poolq up``.

It starts each service (a worker per pool, beat, Flower) as a child in its own
session, prefixes its output, restarts a child that dies (with backoff, giving
up on one that keeps dying at start), and on Ctrl-C or SIGTERM stops them in
tiers: Flower and beat first, then the workers (Celery's warm shutdown lets
in-flight calls finish), so the broker, stopped by the caller after
:meth:`Supervisor.run` returns, outlives every process that uses it.

Foreman-style runners such as honcho stop all children at once, which would
take the broker away from workers in the middle of their warm shutdown; that
ordering is why poolq supervises its processes itself.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

from .procs import child_preexec, stop_process

#: A child that exits within this many seconds of its start counts as failing to start.
QUICK_EXIT = 10.0
#: Quick exits in a row after which the supervisor gives up and stops everything.
MAX_QUICK_EXITS = 5
#: Longest wait, in seconds, before restarting a child that died.
MAX_BACKOFF = 30.0


@dataclass
class Service:
    """One supervised process."""

    name: str
    argv: list[str]
    tier: int = 0  #: higher tiers stop first
    stop_timeout: float = 60.0
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_exits: int = 0
    restart_at: float | None = None
    pump: threading.Thread | None = field(default=None, repr=False)


class Supervisor:
    """Run ``services`` in the foreground until a signal or a hopeless failure."""

    def __init__(self, services: Sequence[Service], env: dict[str, str], out: IO[str]) -> None:
        self.services = list(services)
        self.env = env
        self.out = out
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._width = max((len(s.name) for s in self.services), default=4)

    def log(self, name: str, line: str) -> None:
        with self._lock:
            self.out.write(f"{time.strftime('%H:%M:%S')} {name:<{self._width}} | {line}\n")
            self.out.flush()

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> int:
        """Start everything, supervise, stop everything; 0 after a requested stop."""
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            for service in self.services:
                self._start(service)
            while not self._stop.wait(0.2):
                if not self._check():
                    code = 1
                    break
        finally:
            self.stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def pids(self) -> dict[str, int]:
        return {s.name: s.process.pid for s in self.services if s.process and s.process.poll() is None}

    def stop_all(self) -> None:
        """Stop the children tier by tier (highest first), each tier in parallel."""
        for tier in sorted({s.tier for s in self.services}, reverse=True):
            group = [s for s in self.services if s.tier == tier and s.process is not None]
            for service in group:
                assert service.process is not None
                if service.process.poll() is None:
                    self.log("poolq", f"stopping {service.name} (pid {service.process.pid})")
                    service.process.send_signal(signal.SIGTERM)
            for service in group:
                assert service.process is not None
                stop_process(service.process, timeout=service.stop_timeout)
                if service.pump is not None:
                    service.pump.join(timeout=5)

    def _start(self, service: Service) -> None:
        service.process = subprocess.Popen(
            service.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
            preexec_fn=child_preexec,
        )
        service.started_at = time.monotonic()
        service.restart_at = None
        self.log("poolq", f"started {service.name} (pid {service.process.pid})")
        service.pump = threading.Thread(target=self._pump, args=(service, service.process), daemon=True)
        service.pump.start()

    def _pump(self, service: Service, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            self.log(service.name, raw.decode(errors="replace").rstrip())

    def _check(self) -> bool:
        """Restart dead children; False when one keeps dying and poolq up should give up."""
        now = time.monotonic()
        for service in self.services:
            assert service.process is not None
            if service.restart_at is not None:
                if now >= service.restart_at:
                    self._start(service)
                continue
            code = service.process.poll()
            if code is None:
                continue
            quick = now - service.started_at < QUICK_EXIT
            service.quick_exits = service.quick_exits + 1 if quick else 1
            if service.quick_exits >= MAX_QUICK_EXITS:
                self.log("poolq", f"{service.name} keeps exiting at start (code {code}); stopping everything")
                return False
            delay = min(2.0 ** (service.quick_exits - 1), MAX_BACKOFF)
            self.log("poolq", f"{service.name} exited with code {code}; restarting in {delay:g}s")
            service.restart_at = now + delay
        return True
