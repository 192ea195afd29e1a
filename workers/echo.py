"""The trivial agent: echoes what it is sent, and says who answered."""

from __future__ import annotations

import os
import time
from typing import Any

import poolq


class Echo(poolq.Agent):
    """Answers ``{"text": ..., "agent": ..., "pid": ...}``.

    Options:
        greeting: a prefix added to every echoed text (default: none).
    """

    def setup(self) -> None:
        self.greeting = self.options.get("greeting", "")
        self.served = 0

    def handle(self, text: str = "") -> dict[str, Any]:
        self.served += 1
        return {"text": f"{self.greeting}{text}", "agent": self.name, "pid": os.getpid(), "served": self.served}

    @poolq.operation
    def upper(self, text: str) -> str:
        return text.upper()

    @poolq.operation
    def sleep(self, seconds: float) -> float:
        """Hold the agent for ``seconds`` (to watch queueing and timeouts)."""
        time.sleep(seconds)
        return seconds
