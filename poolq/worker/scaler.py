"""The node scaler: how many agent processes a prefork worker node runs, and which.

It runs in the worker's event loop (like Celery's autoscaler and its
``pool_grow`` / ``pool_shrink`` control commands) and keeps the node at

    base  (set by beat's maintenance, between min_size and max_size)
    + overflow (0 .. max_overflow, while every agent is busy and calls wait)

Why not Celery's ``--autoscale``: it grows on the tasks a node has reserved,
and with prefetch 1 and late acks a busy node reserves nothing more, so it
never sees the backlog. The scaler looks at the queue instead.

It also replaces agents that maintenance marked (too old, too much memory,
unhealthy, failed): it first grows the pool by one process, whose agent is
warm before it takes work, and only then retires the marked process, and only
while that process is idle (Celery has written it no job), so no call is lost
or run twice. One replacement at a time per node.

It converges on the registry (the base size and the replace marks), every
:data:`SYNC_INTERVAL` seconds and whenever maintenance sends the
``poolq_sync`` remote-control command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery.worker import state as worker_state

from .. import registry
from ..config import PoolConfig

logger = logging.getLogger("poolq.worker")

#: Seconds between two checks of the node's load.
TICK = 0.25
#: Seconds between two reads of the registry (base size, replace marks).
SYNC_INTERVAL = 2.0


class RetireRequests:
    """How a prefork child asks its node to retire it once its current call is done.

    A pipe made in the node's main process before it forks: a child writes
    its pid; the main process reads the pipe when a call finishes (in the
    same step that marks the child free, so no other call reaches it) and at
    every tick. A write of a few bytes to a pipe is atomic.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)

    def ask(self) -> None:
        """In a child: retire me after this call."""
        os.write(self._write, f"{os.getpid()}\n".encode())

    def take(self) -> set[int]:
        """In the main process: the pids that asked since the last look."""
        chunks = []
        while True:
            try:
                chunk = os.read(self._read, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return {int(line) for line in b"".join(chunks).split() if line.isdigit()}


@dataclass
class _Replacement:
    pid: int
    agent_id: str
    reason: str
    grown: bool = False


class NodeScaler:
    """Sizes one prefork worker node and replaces its marked agents."""

    def __init__(
        self,
        worker: Any,
        pool: PoolConfig,
        node: str,
        state: redis.Redis,
        base: int,
        waiting: Callable[[], int],
        on_change: Callable[[int], None],
        request_maintenance: Callable[[], None] = lambda: None,
        retire_requests: RetireRequests | None = None,
    ) -> None:
        self.worker = worker
        self.retire_requests = retire_requests
        self.asked_to_retire: set[int] = set()
        self.hostname = socket.gethostname()
        self.pids: set[int] = {p.pid for p in worker.pool._pool._pool if p.pid}
        self.pool = pool
        self.node = node
        self.state = state
        self.base = base
        self.waiting = waiting
        self.on_change = on_change
        self.request_maintenance = request_maintenance
        self.next_request = 0.0
        self.last_needed = time.monotonic()
        self.next_sync = 0.0
        self.replacing: _Replacement | None = None

    def tick(self) -> None:
        try:
            now = time.monotonic()
            self.reap()
            for pid in self._asked():
                self.process_finished(pid, look=False)
            if now >= self.next_sync:
                self.sync()
            self.step(now)
        except Exception:
            logger.exception("node scaler step failed")

    def process_finished(self, pid: int, look: bool = True) -> None:
        """A process is done with its call (and idle, for this instant): retire it now if it asked to go."""
        if look:
            self._asked()
        if pid not in self.asked_to_retire:
            return
        retired = self._retire(pid)
        if retired is None:
            return  # busy after all: at the next call's end
        self.asked_to_retire.discard(pid)
        if retired:
            self._update_prefetch(-1)
            self._grow()  # its replacement, warm before it takes work
            registry.count(self.state, self.pool.name, recycles=1)
            logger.info("node %s: retired process %d at its request, starting its replacement", self.node, pid)

    def reap(self) -> None:
        """Notice a process that died (killed, crashed) at once, and drop its agent from the registry.

        Celery looks for dead processes every 5 s; until then their call is
        not handed on and their heartbeat keeps them in the status, busy.
        """
        pool = self.worker.pool._pool
        if any(p.exitcode is not None for p in list(pool._pool)):
            pool.maintain_pool()  # billiard reaps it, fails its call over (WorkerLostError) and replaces it
        pids = {p.pid for p in pool._pool if p.pid}
        for pid in self.pids - pids:
            self.asked_to_retire.discard(pid)
            with contextlib.suppress(redis.RedisError):
                registry.remove(self.state, self.pool.name, f"{self.pool.name}@{self.hostname}:{pid}")
        self.pids = pids

    def _asked(self) -> set[int]:
        if self.retire_requests is not None:
            self.asked_to_retire |= self.retire_requests.take()
        return set(self.asked_to_retire)

    def sync(self) -> None:
        """Read the base size and the replace marks of this node's agents from the registry."""
        self.next_sync = time.monotonic() + SYNC_INTERVAL
        snap = registry.snapshot(self.state, self.pool.name)
        scaled = snap.stats.get("scaled_size")
        if scaled:
            self.base = min(max(int(scaled), self.pool.min_size), self.pool.max_size)
        if self.replacing is None:
            for record in snap.agents:
                if record.get("node") == self.node and record.get("replace"):
                    self.replacing = _Replacement(int(record.get("pid", 0)), record["id"], record["replace"])
                    logger.info("replacing agent %s: %s", record.get("name", record["id"]), record["replace"])
                    break

    def step(self, now: float) -> None:
        pool = self.worker.pool
        processes = int(pool.num_processes)
        if self.replacing is not None:
            self._replace_step(processes)
            return
        active = len(worker_state.active_requests)
        if active > self.base:
            self.last_needed = now
        starting = self._starting()
        if processes < self.base and not starting:
            # Up to the base size in one step: the burst that raised it waits.
            self._resize(self.base - processes, processes, f"base size {self.base}")
        elif processes < self.base + self.pool.max_overflow and active >= processes and not starting:
            waiting = self.waiting()
            if waiting > 0:
                self._resize(+1, processes, f"all {processes} agents busy and {waiting} calls waiting")
                self.last_needed = now
        elif (
            active >= processes
            and self.base < self.pool.max_size
            and not starting
            and now >= self.next_request
            and self.waiting() > 0
        ):
            # Full, with work waiting, and the pool may grow: ask for
            # maintenance now rather than at beat's next tick. Its policy
            # decides; beat remains the backstop.
            self.next_request = now + self.pool.maintenance_interval
            self.request_maintenance()
        elif processes > self.base and active < processes and now - self.last_needed > self._idle_before_shrink():
            self._resize(-1, processes, f"above base size {self.base} and idle")
            self.last_needed = now  # one process at a time

    def _idle_before_shrink(self) -> float:
        return self.pool.overflow_idle if self.pool.max_overflow else 0.0

    def _replace_step(self, processes: int) -> None:
        job = self.replacing
        assert job is not None
        if not job.grown:
            if not self._starting():
                self._grow()
                job.grown = True
            return
        if self._starting():
            return  # the replacement is not warm yet
        retired = self._retire(job.pid)
        if retired is None:
            return  # busy: retire it after its call
        self._update_prefetch(-1)
        self.replacing = None
        if retired:
            registry.count(self.state, self.pool.name, recycles=1)
            logger.info("agent %s replaced (%s)", job.agent_id, job.reason)

    def _resize(self, delta: int, before: int, reason: str) -> None:
        if delta > 0:
            self._grow(delta)
        else:
            # Not billiard's shrink(): it may pick a process that is already
            # terminating but not yet reaped, and then no process stops at all.
            if not any(self._retire(p.pid) for p in self._live_processes()):
                return  # every process is busy
            self._update_prefetch(-1)
        after = before + delta
        direction = "up" if delta > 0 else "down"
        logger.info("node %s: %s from %d to %d agents (%s)", self.node, direction, before, after, reason)
        self.on_change(after)
        try:
            registry.record_scale(self.state, self.pool.name, direction, before, after, reason, time.time(), self.node)
        except redis.RedisError:
            logger.warning("could not record the scale event", exc_info=True)

    def _grow(self, processes: int = 1) -> None:
        self.worker.pool.grow(processes)
        # billiard starts the new processes at its next pool maintenance, which
        # Celery runs every 5 s; start them now.
        self.worker.pool._pool.maintain_pool()
        self._update_prefetch(+processes)

    def _update_prefetch(self, delta: int) -> None:
        self.worker.consumer._update_prefetch_count(delta)

    def _starting(self) -> bool:
        # AsynPool keeps the processes that have not yet sent their "up"
        # message (their agent is still setting up) in _waiting_to_start.
        return bool(getattr(self.worker.pool._pool, "_waiting_to_start", ()))

    def _live_processes(self) -> list[Any]:
        pool = self.worker.pool._pool
        return [p for p in pool._pool if p.exitcode is None and not getattr(p, "_controlled_termination", False)]

    def _retire(self, pid: int) -> bool | None:
        """Stop process ``pid`` if it is idle: True done, False already gone, None busy (try again).

        This is billiard's ``shrink`` aimed at one process: Celery's pool only
        offers to shrink "some idle process".
        """
        pool = self.worker.pool._pool
        process = next((p for p in pool._pool if p.pid == pid), None)
        if process is None:
            pool._processes -= 1  # it died on its own: do not replace it twice
            return False
        if process.inqW_fd in pool._busy_workers or pool._worker_active(process):
            return None
        pool._processes -= 1
        if pool._putlock:
            pool._putlock.shrink()
        process.terminate_controlled()
        pool.on_shrink(1)
        return True
