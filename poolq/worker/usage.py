"""What an agent's process uses: its memory now, and its CPU over a window."""

from __future__ import annotations

import time
from collections import deque

import psutil


def rss_mb() -> float:
    """This process's resident memory now, in MB.

    Not ``ru_maxrss`` (what Celery's ``max_memory_per_child`` reads): that is
    the peak, which never falls, and a forked child inherits its parent's.
    """
    return float(psutil.Process().memory_info().rss) / 2**20


class CpuWindow:
    """A process's CPU use, averaged over the last ``window`` seconds (sampled every heartbeat)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.samples: deque[tuple[float, float]] = deque()
        self.process = psutil.Process()

    def sample(self) -> None:
        times = self.process.cpu_times()
        now = time.monotonic()
        self.samples.append((now, times.user + times.system))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def average(self) -> float | None:
        """Percent of one core over the window, or None until a whole window was seen."""
        if len(self.samples) < 2:
            return None
        (start, used_start), (end, used_end) = self.samples[0], self.samples[-1]
        if end - start < self.window * 0.9:
            return None
        return 100.0 * (used_end - used_start) / (end - start)
