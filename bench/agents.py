"""The agents the benchmarks run (importable by poolq workers and by the bare Celery worker)."""

from __future__ import annotations

import time
from typing import Any

import poolq


class Echo(poolq.Agent):
    """Returns what it is given: the call path's cost, and nothing else."""

    def handle(self, value: Any = None) -> Any:
        return value

    @poolq.operation
    def sleep(self, seconds: float, marker: str = "") -> str:
        time.sleep(seconds)
        return marker


class Heavy(poolq.Agent):
    """An agent whose setup takes ``options.setup_seconds`` (1 s by default)."""

    def setup(self) -> None:
        time.sleep(float(self.options.get("setup_seconds", 1.0)))
        self.ready = True

    def handle(self, value: Any = None) -> Any:
        return value
