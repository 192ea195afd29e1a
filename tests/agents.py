"""Agents for poolq's own tests: each records what happened to it in Redis.

``options.redis_url`` says where; the records live under ``test:<pool>:``:
``events`` (setup/teardown/reset lines with pid and agent name) and ``ran``
(the markers of the calls that actually ran).
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

import poolq

_KEEP_MAX = (
    "if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end"
)


_LEAKED: list[bytearray] = []


class Probe(poolq.Agent):
    """A configurable agent for lifecycle, timeout and error tests.

    Options:
        redis_url: where to record events (required).
        setup_seconds: how long setup() sleeps (default 0).
        fail_setup: setup() raises (default false).
    """

    def setup(self) -> None:
        self.redis = redis.Redis.from_url(self.options["redis_url"], decode_responses=True)
        self.key = f"test:{self.pool}"
        time.sleep(float(self.options.get("setup_seconds", 0)))
        if self.options.get("fail_setup") or self.redis.exists(f"{self.key}:fail_setup"):
            self.redis.rpush(f"{self.key}:events", f"setup_failed {os.getpid()} {self.name}")
            raise RuntimeError("setup failed on purpose")
        self.redis.rpush(f"{self.key}:events", f"setup {os.getpid()} {self.name}")
        self.calls = 0

    def handle(self, marker: str | None = None, sleep: float = 0.0) -> dict[str, Any]:
        self.calls += 1
        if marker is not None:
            self.redis.rpush(f"{self.key}:ran", marker)
        time.sleep(sleep)
        return {"pid": os.getpid(), "agent": self.name, "marker": marker, "calls": self.calls}

    @poolq.operation
    def fail(self, message: str, break_agent: bool = False) -> None:
        self.broken = break_agent
        raise ValueError(message)

    @poolq.operation
    def work(self, marker: str, sleep: float = 0.0) -> dict[str, Any]:
        """Record the start and the end of a call, to count runs and completions."""
        self.redis.rpush(f"{self.key}:ran", marker)
        time.sleep(sleep)
        self.redis.rpush(f"{self.key}:done", marker)
        return {"marker": marker, "pid": os.getpid(), "agent": self.name}

    @poolq.operation
    def patient(self, marker: str, seconds: float = 30.0) -> dict[str, Any]:
        """Run up to ``seconds``, stopping early once the call is cancelled (``stopped``), else ``done``."""
        self.redis.rpush(f"{self.key}:ran", marker)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.cancelled():
                self.redis.rpush(f"{self.key}:stopped", marker)
                return {"marker": marker, "stopped": True, "pid": os.getpid()}
            time.sleep(0.02)
        self.redis.rpush(f"{self.key}:done", marker)
        return {"marker": marker, "stopped": False, "pid": os.getpid()}

    @poolq.operation
    def hog(self, mb: int) -> int:
        """Hold ``mb`` MB in the agent (given back by teardown)."""
        self.ballast = bytearray(mb * 2**20)
        return len(self.ballast) // 2**20

    @poolq.operation
    def leak(self, mb: int) -> int:
        """Hold ``mb`` MB in the process, out of the agent's reach (teardown cannot give it back)."""
        _LEAKED.append(bytearray(mb * 2**20))
        return sum(len(b) for b in _LEAKED) // 2**20

    @poolq.operation
    def crash(self) -> None:
        """Kill the worker process mid-call (a poison pill)."""
        os._exit(1)

    def healthy(self) -> bool:
        if getattr(self, "broken", False):
            return False
        return not self.redis.exists(f"{self.key}:unhealthy:{self.name}")

    @poolq.operation
    def bad_result(self) -> Any:
        return {1, 2, 3}

    @poolq.operation
    def add(self, a: int, b: int) -> int:
        return a + b

    @poolq.operation
    def track(self, sleep: float) -> dict[str, Any]:
        """Hold the agent for ``sleep`` s while counting how many agents of the pool run at once."""
        running = self.redis.incr(f"{self.key}:running")
        self.redis.eval(_KEEP_MAX, 1, f"{self.key}:max_running", running)
        try:
            time.sleep(sleep)
        finally:
            self.redis.decr(f"{self.key}:running")
        return {"pid": os.getpid(), "agent": self.name}

    @poolq.operation
    def stamp(self, marker: str) -> float:
        """Record when this operation started (this machine's clock), to check a rate limit."""
        started = time.time()
        self.redis.rpush(f"{self.key}:starts", f"{marker} {started!r}")
        return started

    @poolq.operation
    def burn(self, seconds: float) -> int:
        """Keep one core busy for ``seconds`` (to cross max_cpu_percent)."""
        deadline, spins = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            spins += 1
        return spins

    def reset(self) -> None:
        self.calls = 0
        self.redis.rpush(f"{self.key}:events", f"reset {os.getpid()} {self.name}")

    def teardown(self) -> None:
        self.ballast = bytearray()
        self.redis.rpush(f"{self.key}:events", f"teardown {os.getpid()} {self.name}")


class DeviceProbe(poolq.Agent):
    """Says where poolq placed it: its device, and the GPUs its process shows (at setup and now)."""

    def setup(self) -> None:
        self.visible_at_setup = os.environ.get("CUDA_VISIBLE_DEVICES")

    def handle(self, sleep: float = 0.0) -> dict[str, Any]:
        time.sleep(sleep)
        return {
            "pid": os.getpid(),
            "agent": self.name,
            "device": self.device,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "visible_at_setup": self.visible_at_setup,
        }


def events(redis_client: redis.Redis, pool: str, kind: str | None = None) -> list[list[str]]:
    """The recorded events of ``pool`` as [kind, pid, agent] lists."""
    rows = [line.split(" ", 2) for line in redis_client.lrange(f"test:{pool}:events", 0, -1)]
    return [row for row in rows if kind is None or row[0] == kind]


def ran(redis_client: redis.Redis, pool: str) -> list[str]:
    """The markers of the calls of ``pool`` that ran."""
    return list(redis_client.lrange(f"test:{pool}:ran", 0, -1))


def max_running(redis_client: redis.Redis, pool: str) -> int:
    """The most calls of ``pool``'s ``track`` operation that ran at the same time."""
    return int(redis_client.get(f"test:{pool}:max_running") or 0)


def clear(redis_client: redis.Redis, pool: str) -> None:
    keys = ("events", "ran", "done", "stopped", "running", "max_running", "fail_setup", "starts")
    redis_client.delete(*(f"test:{pool}:{key}" for key in keys))


def done(redis_client: redis.Redis, pool: str) -> list[str]:
    """The markers of the ``work`` calls of ``pool`` that ran to their end."""
    return list(redis_client.lrange(f"test:{pool}:done", 0, -1))
