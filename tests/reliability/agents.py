"""The agent of the reliability suite: it writes every start and end of a call to a ledger file.

A file, not Redis: the ledger must survive the broker restarts the suite
injects. Each line is appended whole (``O_APPEND``, one short write), so
processes on the same machine never interleave lines.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import poolq

_LEAKED: list[bytearray] = []


class Ledgered(poolq.Agent):
    """Options:
    ledger: the ledger file (required).
    setup_seconds: how long setup() takes (default 0).
    hang_while: a path; while that file exists, setup() hangs.
    stubborn: when hanging, ignore every interruption (default false).
    """

    def setup(self) -> None:
        self.ledger = Path(self.options["ledger"])
        self.record("setup", self.name)
        time.sleep(float(self.options.get("setup_seconds", 0)))
        flag = self.options.get("hang_while")
        if flag and Path(flag).exists():
            _sleep(3600, stubborn=bool(self.options.get("stubborn")))

    def record(self, kind: str, marker: str) -> None:
        with self.ledger.open("a") as ledger:
            ledger.write(f"{kind} {marker} {os.getpid()} {time.time():.3f}\n")

    def handle(self, marker: str = "") -> dict[str, Any]:
        return self.work(marker)

    @poolq.operation
    def work(self, marker: str, seconds: float = 0.0) -> dict[str, Any]:
        """Record the start and the end of the call, to count runs and completions."""
        self.record("start", marker)
        time.sleep(seconds)
        self.record("done", marker)
        return {"marker": marker, "pid": os.getpid(), "agent": self.name}

    @poolq.operation
    def swallow(self, marker: str, seconds: float) -> str:
        """Work that catches every Exception around its sleep (an agent that swallows errors)."""
        self.record("start", marker)
        with contextlib.suppress(Exception):  # the point of this agent
            time.sleep(seconds)
        self.record("done", marker)
        return marker

    @poolq.operation
    def stubborn(self, marker: str, seconds: float) -> str:
        """Work that ignores every interruption, even BaseExceptions: only ending the process stops it."""
        self.record("start", marker)
        _sleep(seconds, stubborn=True)
        self.record("done", marker)
        return marker

    @poolq.operation
    def crash(self, marker: str) -> None:
        """Kill the worker process mid-call (a poison pill)."""
        self.record("start", marker)
        os._exit(1)

    @poolq.operation
    def leak(self, mb: int) -> int:
        """Hold ``mb`` MB in the process, out of the agent's reach (teardown cannot give it back)."""
        _LEAKED.append(bytearray(mb * 2**20))
        return os.getpid()

    @poolq.operation
    def echo(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"args": list(args), "kwargs": kwargs}


def _sleep(seconds: float, stubborn: bool) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        except BaseException:
            if not stubborn:
                raise


class Ledger:
    """Reads what the agents wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        return [line.split() for line in self.path.read_text().splitlines() if line.strip()]

    def count(self, kind: str) -> Counter[str]:
        """How many times each marker was recorded as ``kind`` (start, done, setup)."""
        return Counter(row[1] for row in self.lines() if row[0] == kind)

    def pids(self, kind: str, marker: str) -> list[int]:
        return [int(row[2]) for row in self.lines() if row[0] == kind and row[1] == marker]

    def at(self, kind: str, marker: str) -> list[float]:
        return [float(row[3]) for row in self.lines() if row[0] == kind and row[1] == marker]
