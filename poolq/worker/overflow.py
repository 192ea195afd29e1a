"""Overflow: extra agents a worker node starts under load and retires when idle.

Celery's ``--autoscale`` decides from the tasks a node has reserved; with
prefetch 1 and late acks a busy node reserves nothing more, so it never sees
the backlog and does not grow. This controller looks at the queue instead:
when every process of the node is busy and calls wait, it grows the prefork
pool by one process (whose agent is warm before it takes work), up to
``size + max_overflow``; when the extra processes have not been needed for
``overflow_idle`` seconds, it shrinks the pool back, one idle process at a
time, never below ``size``. It runs in the worker's event loop, like Celery's
own autoscaler and its ``pool_grow`` / ``pool_shrink`` control commands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.worker import state as worker_state

from .. import registry
from ..config import PoolConfig

logger = logging.getLogger("poolq.worker")

#: Seconds between two overflow checks.
TICK = 0.25


class OverflowController:
    """Grows and shrinks one prefork worker node between size and size + max_overflow."""

    def __init__(
        self,
        worker: Any,
        pool: PoolConfig,
        node: str,
        state: redis.Redis,
        waiting: Callable[[], int],
        on_change: Callable[[int], None],
    ) -> None:
        self.worker = worker
        self.pool = pool
        self.node = node
        self.state = state
        self.waiting = waiting
        self.on_change = on_change
        self.last_needed = time.monotonic()

    def tick(self) -> None:
        try:
            self.step(time.monotonic())
        except Exception:
            logger.exception("overflow check failed")

    def step(self, now: float) -> None:
        pool = self.worker.pool
        processes = int(pool.num_processes)
        active = len(worker_state.active_requests)
        if active > self.pool.size:
            self.last_needed = now
        limit = self.pool.size + self.pool.max_overflow
        if processes < limit and active >= processes and not self._starting(pool):
            waiting = self.waiting()
            if waiting > 0:
                self._resize(+1, processes, f"all {processes} agents busy and {waiting} calls waiting")
                self.last_needed = now
        elif processes > self.pool.size and active < processes and now - self.last_needed > self.pool.overflow_idle:
            self._resize(-1, processes, f"overflow idle for {self.pool.overflow_idle:g}s")
            self.last_needed = now  # one process per overflow_idle period, not all at once

    def _resize(self, delta: int, before: int, reason: str) -> None:
        pool, consumer = self.worker.pool, self.worker.consumer
        try:
            if delta > 0:
                pool.grow(1)
                # billiard starts the new process on its next pool maintenance,
                # which Celery runs every 5 s; start it now.
                pool._pool.maintain_pool()
            else:
                pool.shrink(1)
        except ValueError:  # billiard: every process busy, nothing to shrink
            return
        consumer._update_prefetch_count(delta)
        after = before + delta
        logger.info("overflow: %s from %d to %d agents (%s)", "up" if delta > 0 else "down", before, after, reason)
        self.on_change(after)
        try:
            registry.record_scale(
                self.state, self.pool.name, "up" if delta > 0 else "down", before, after, reason, time.time(), self.node
            )
        except redis.RedisError:
            logger.warning("could not record the scale event", exc_info=True)

    @staticmethod
    def _starting(pool: Any) -> bool:
        # AsynPool keeps the processes that have not yet sent their "up"
        # message (their agent is still setting up) in _waiting_to_start.
        return bool(getattr(getattr(pool, "_pool", None), "_waiting_to_start", ()))
