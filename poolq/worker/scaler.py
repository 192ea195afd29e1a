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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery.worker import state as worker_state

from ..config import PoolConfig
from ..store import keys, registry

logger = logging.getLogger("poolq.worker")

#: Seconds between two checks of the node's load.
TICK = 0.25
#: Seconds between two reads of the registry (base size, replace marks).
SYNC_INTERVAL = 2.0


class RetireRequests:
    """How a prefork child asks its node to replace it, warm first (it reached a limit).

    A pipe made in the node's main process before it forks: a child writes
    one line (pid, slot, recycles, reason); the main process reads the pipe at
    every tick and when a call finishes. A write of a short line to a pipe is
    atomic, so children never interleave.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)

    def ask(self, slot: str, recycles: int, reason: str) -> None:
        """In a child: replace me (I keep serving until my replacement is warm)."""
        line = "\t".join((str(os.getpid()), slot, str(recycles), reason.replace("\t", " ").replace("\n", " ")))
        os.write(self._write, (line[:500] + "\n").encode())

    def take(self) -> list[_Replacement]:
        """In the main process: the requests made since the last look."""
        chunks = []
        while True:
            try:
                chunk = os.read(self._read, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        jobs = []
        for line in b"".join(chunks).decode(errors="replace").splitlines():
            pid, slot, recycles, reason = [*line.split("\t", 3), "", "", ""][:4]
            if pid.isdigit():
                jobs.append(_Replacement(int(pid), "", reason, slot, int(recycles) if recycles.isdigit() else 0))
        return jobs


#: Set in a node's main process just around the fork of a replacement: the new
#: child reads it (it inherits the parent's memory) and takes over that slot and
#: its recycle count. None for any other new process.
NEXT_SLOT: tuple[str, int] | None = None


@dataclass
class _Replacement:
    """Replace process ``pid``: grow a new one first, retire the old once the new one is warm."""

    pid: int
    agent_id: str
    reason: str
    slot: str = ""
    recycles: int = 0
    grown: bool = False
    new_pids: set[int] = field(default_factory=set)


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
        on_base: Callable[[int], None] = lambda base: None,
        retire_requests: RetireRequests | None = None,
    ) -> None:
        self.worker = worker
        self.retire_requests = retire_requests
        self.queue: deque[_Replacement] = deque()
        self.hostname = socket.gethostname()
        self.pids: set[int] = {p.pid for p in worker.pool._pool._pool if p.pid}
        self.pool = pool
        self.node = node
        self.state = state
        self.base = base
        self.waiting = waiting
        self.on_change = on_change
        self.on_base = on_base
        self.request_maintenance = request_maintenance
        self.next_request = 0.0
        self.last_needed = time.monotonic()
        self.next_sync = 0.0
        self.replacing: _Replacement | None = None

    def tick(self) -> None:
        try:
            now = time.monotonic()
            self.reap()
            self._take_requests()
            if now >= self.next_sync:
                self.sync()
            self.step(now)
        except Exception:
            logger.exception("node scaler step failed")

    def process_finished(self, pid: int) -> None:
        """A process is done with its call, and idle for this instant: retire it now if its replacement is warm."""
        self._take_requests()
        job = self.replacing
        if job is not None and job.pid == pid and job.grown and not self._starting():
            self._finish_replacement(job)

    def resize_by_request(self, delta: int) -> dict[str, str]:
        """Remote control ``pool_grow`` / ``pool_shrink`` (Flower's buttons), kept within the pool's bounds.

        Growing is allowed up to the base size plus ``max_overflow`` (the extra
        processes retire after ``overflow_idle``, like overflow); shrinking
        not below the base size, which maintenance sets.
        """
        processes = int(self.worker.pool.num_processes)
        ceiling, floor = self.base + self.pool.max_overflow, self.base
        target = min(max(processes + delta, floor), ceiling)
        if target == processes:
            bound = f"base {self.base} + max_overflow {self.pool.max_overflow}" if delta > 0 else f"base {self.base}"
            return {"error": f"pool {self.pool.name} stays at {processes} processes: the bound is {bound}"}
        self._resize(target - processes, processes, "remote control")
        self.last_needed = time.monotonic()
        return {"ok": f"pool {self.pool.name}: {processes} -> {target} processes"}

    def drain_idle(self) -> int:
        """Retire the idle processes above the base size now (``poolq drain``); how many."""
        processes = int(self.worker.pool.num_processes)
        excess = processes - self.base
        if excess <= 0 or self.replacing is not None:
            return 0
        self._resize(-excess, processes, "drained by request")
        return processes - int(self.worker.pool.num_processes)

    def enqueue(self, job: _Replacement) -> None:
        """Replace ``job.pid`` after the replacements already asked for (one at a time per node)."""
        if any(j.pid == job.pid for j in (*self.queue, *([self.replacing] if self.replacing else []))):
            return
        self.queue.append(job)
        logger.info("node %s: will replace process %d, warm first (%s)", self.node, job.pid, job.reason)

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
            self.queue = deque(j for j in self.queue if j.pid != pid)
            with contextlib.suppress(redis.RedisError):
                registry.remove(self.state, self.pool.name, f"{self.pool.name}@{self.hostname}:{pid}")
        self.pids = pids

    def _take_requests(self) -> None:
        if self.retire_requests is not None:
            for job in self.retire_requests.take():
                self.enqueue(job)

    def sync(self) -> None:
        """Read the base size and the replace marks of this node's agents from the registry."""
        self.next_sync = time.monotonic() + SYNC_INTERVAL
        snap = registry.snapshot(self.state, self.pool.name)
        scaled = snap.stats.get("scaled_size")
        if scaled:
            base = min(max(int(scaled), self.pool.min_size), self.pool.max_size)
            if base != self.base:
                self.base = base
                self.on_base(base)
        for record in snap.agents:
            if record.node == self.node and record.replace and record.pid:
                self.enqueue(_Replacement(record.pid, record.id, record.replace, record.slot, record.recycles))

    def step(self, now: float) -> None:
        pool = self.worker.pool
        processes = int(pool.num_processes)
        if self.replacing is None and self.queue:
            self.replacing = self.queue.popleft()
        if self.replacing is not None:
            self._replace_step()
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

    def _replace_step(self) -> None:
        global NEXT_SLOT
        job = self.replacing
        assert job is not None
        if job.pid not in self.pids:
            self.replacing = None  # it died meanwhile: billiard replaces it
            return
        if not job.grown:
            if self._starting():
                return
            before = set(self.pids)
            # The new process takes the old one's slot over (it reads NEXT_SLOT after the fork).
            NEXT_SLOT = (job.slot, job.recycles + 1) if job.slot else None
            try:
                self._grow()
            finally:
                NEXT_SLOT = None
            job.new_pids = {p.pid for p in self.worker.pool._pool._pool if p.pid} - before
            self.pids |= job.new_pids
            job.grown = True
            return
        if self._starting():
            return  # the replacement is not warm yet: the old agent keeps serving
        self._finish_replacement(job)

    def _finish_replacement(self, job: _Replacement) -> None:
        """Retire the replaced process, if idle (else at the end of its call), now that its replacement is warm."""
        if not self._replacement_serves(job):
            # Its replacement could not be set up: keep the agent that works, drop the new one.
            logger.warning("node %s: the replacement of process %d failed its setup; keeping it", self.node, job.pid)
            for pid in job.new_pids:
                if self._retire(pid):
                    self._update_prefetch(-1)
            self.replacing = None
            return
        retired = self._retire(job.pid)
        if retired is None:
            return  # busy: retired when its call ends (process_finished)
        self._update_prefetch(-1)
        self.replacing = None
        if retired:
            registry.count(self.state, self.pool.name, recycles=1)
            logger.info("node %s: process %d replaced, warm first (%s)", self.node, job.pid, job.reason)

    def _replacement_serves(self, job: _Replacement) -> bool:
        try:
            states = [
                self.state.hget(keys.agent(f"{self.pool.name}@{self.hostname}:{pid}"), "state") for pid in job.new_pids
            ]
        except redis.RedisError:
            return True  # cannot tell: the replacement is up, trust it
        return all(state != "failed" for state in states)

    def _resize(self, delta: int, before: int, reason: str) -> None:
        if delta > 0:
            self._grow(delta)
        else:
            # Not billiard's shrink(): it may pick a process that is already
            # terminating but not yet reaped, and then no process stops at all.
            retired = 0
            for process in self._live_processes():
                if retired < -delta and self._retire(process.pid):
                    retired += 1
            if not retired:
                return  # every process is busy
            self._update_prefetch(-retired)
            delta = -retired
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
