"""The node scaler: carries out :mod:`poolq.scaling.node`'s decisions on a prefork node's pool.

It runs in the worker's event loop (like Celery's autoscaler and its
``pool_grow`` / ``pool_shrink`` control commands), every :data:`TICK` seconds.
Why not Celery's ``--autoscale``: it grows on the tasks a node has reserved,
and with prefetch 1 and late acks a busy node reserves nothing more, so it
never sees the backlog. The decisions look at the queue instead.

Every billiard internal poolq touches is in :class:`Processes`: Celery's pool
offers to grow, and to shrink "some idle process", but not to retire one
process chosen by pid, to tell starting processes from warm ones, or to notice
a dead process before its own 5 s maintenance.

It converges on the registry (the base size and the replace marks), every
:data:`SYNC_INTERVAL` seconds and whenever maintenance sends the
``poolq_sync`` remote-control command. Children ask for their own warm
replacement through :class:`RetireRequests`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.worker import state as worker_state

from .. import events
from ..config import PoolConfig
from ..scaling import node
from ..scaling.node import Grow, GrowReplacement, NodePlan, NodeView, Replacement, RequestMaintenance, RetireReplaced
from ..store import keys, registry
from . import recycling

logger = logging.getLogger("poolq.worker")

#: Seconds between two steps of the scaler.
TICK = 0.25
#: Seconds between two reads of the registry (base size, replace marks).
SYNC_INTERVAL = 2.0

#: Set in a node's main process just around the fork of a replacement: the new
#: child reads it (it inherits the parent's memory) and takes over that slot and
#: its recycle count. None for any other new process.
NEXT_SLOT: tuple[str, int] | None = None


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

    def take(self) -> list[Replacement]:
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
                jobs.append(Replacement(int(pid), "", reason, slot, int(recycles) if recycles.isdigit() else 0))
        return jobs


class Processes:
    """A prefork node's processes, through billiard's internals (all of them, here)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    @property
    def _pool(self) -> Any:
        return self.worker.pool._pool

    def count(self) -> int:
        return int(self.worker.pool.num_processes)

    def pids(self) -> set[int]:
        return {p.pid for p in self._pool._pool if p.pid}

    def starting(self) -> bool:
        # AsynPool keeps the processes that have not yet sent their "up"
        # message (their agent is still setting up) in _waiting_to_start.
        return bool(getattr(self._pool, "_waiting_to_start", ()))

    def reap(self) -> None:
        """Let billiard notice a dead process now (it fails its call over and replaces it)."""
        if any(p.exitcode is not None for p in list(self._pool._pool)):
            self._pool.maintain_pool()

    def grow(self, count: int = 1) -> set[int]:
        """Start ``count`` processes now (not at Celery's next 5 s maintenance); their pids."""
        before = self.pids()
        self.worker.pool.grow(count)
        self._pool.maintain_pool()
        self.prefetch(+count)
        return self.pids() - before

    def retire(self, pid: int) -> bool | None:
        """Stop process ``pid`` if it is idle: True done, False already gone, None busy (try again).

        This is billiard's ``shrink`` aimed at one process: Celery's pool only
        offers to shrink "some idle process", and may pick one that is already
        terminating but not yet reaped, and then no process stops at all.
        """
        pool = self._pool
        process = next((p for p in pool._pool if p.pid == pid), None)
        if process is None:
            pool._processes -= 1  # it died on its own: do not replace it twice
            self.prefetch(-1)
            return False
        if process.inqW_fd in pool._busy_workers or pool._worker_active(process):
            return None
        pool._processes -= 1
        if pool._putlock:
            pool._putlock.shrink()
        process.terminate_controlled()
        pool.on_shrink(1)
        self.prefetch(-1)
        return True

    def retire_idle(self, count: int) -> int:
        """Retire up to ``count`` idle processes; how many."""
        live = [p.pid for p in self._pool._pool if p.exitcode is None and not getattr(p, "_controlled_termination", 0)]
        retired = 0
        for pid in live:
            if retired < count and self.retire(pid):
                retired += 1
        return retired

    def prefetch(self, delta: int) -> None:
        self.worker.consumer._update_prefetch_count(delta)


class NodeScaler:
    """Sizes one prefork worker node and replaces its agents, warm first."""

    def __init__(
        self,
        worker: Any,
        pool: PoolConfig,
        node_name: str,
        state: redis.Redis,
        base: int,
        waiting: Callable[[], int],
        on_change: Callable[[int], None],
        request_maintenance: Callable[[], None] = lambda: None,
        on_base: Callable[[int], None] = lambda base: None,
        retire_requests: RetireRequests | None = None,
    ) -> None:
        self.processes = Processes(worker)
        self.pool = pool
        self.node = node_name
        self.state = state
        self.plan = NodePlan(base=base, last_needed=time.monotonic())
        self.waiting = waiting
        self.on_change = on_change
        self.on_base = on_base
        self.request_maintenance = request_maintenance
        self.retire_requests = retire_requests
        self.hostname = socket.gethostname()
        self.pids = self.processes.pids()
        self.next_sync = 0.0

    @property
    def base(self) -> int:
        return self.plan.base

    def tick(self) -> None:
        try:
            now = time.monotonic()
            self.reap()
            self._take_requests()
            if now >= self.next_sync:
                self.sync()
            self._act(node.step(self.plan, self.pool, self._view(), now, self.waiting))
        except Exception:
            logger.exception("node scaler step failed")

    def sync(self) -> None:
        """Read the base size and the replace marks of this node's agents from the registry."""
        self.next_sync = time.monotonic() + SYNC_INTERVAL
        snap = registry.snapshot(self.state, self.pool.name)
        scaled = snap.stats.get("scaled_size")
        if scaled:
            base = node.clamp_base(self.pool, int(scaled))
            if base != self.plan.base:
                self.plan.base = base
                self.on_base(base)
        for record in snap.agents:
            if record.node == self.node and record.replace and record.pid:
                self._enqueue(Replacement(record.pid, record.id, record.replace, record.slot, record.recycles))

    def process_finished(self, pid: int) -> None:
        """A process is done with its call, and idle for this instant: retire it now if its replacement is warm."""
        self._take_requests()
        job = self.plan.replacing
        if job is not None and job.pid == pid and job.grown and not self.processes.starting():
            self._finish_replacement(job)

    def reap(self) -> None:
        """Notice a process that died (killed, crashed) at once, and drop its agent from the registry.

        Celery looks for dead processes every 5 s; until then their call is
        not handed on and their heartbeat keeps them in the status, busy.
        """
        self.processes.reap()
        pids = self.processes.pids()
        for pid in self.pids - pids:
            self.plan.forget(pid)
            with contextlib.suppress(redis.RedisError):
                registry.remove(self.state, self.pool.name, f"{self.pool.name}@{self.hostname}:{pid}")
        self.pids = pids

    def resize_by_request(self, delta: int) -> dict[str, str]:
        """Remote control ``pool_grow`` / ``pool_shrink`` (Flower's buttons), kept within the pool's bounds.

        Extra processes retire after ``overflow_idle``, like overflow.
        """
        processes = self.processes.count()
        target, limit = node.resize_target(self.pool, self.plan, processes, delta)
        if target == processes:
            return {"error": f"pool {self.pool.name} stays at {processes} processes: the bound is {limit}"}
        self._resize(target - processes, processes, "remote control")
        self.plan.last_needed = time.monotonic()
        return {"ok": f"pool {self.pool.name}: {processes} -> {target} processes"}

    def drain_idle(self) -> int:
        """Retire the idle processes above the base size now (``poolq drain``); how many."""
        processes = self.processes.count()
        if processes <= self.plan.base or self.plan.replacing is not None:
            return 0
        return -self._resize(self.plan.base - processes, processes, "drained by request")

    # -- carrying decisions out ------------------------------------------------

    def _view(self) -> NodeView:
        return NodeView(self.processes.count(), self.processes.starting(), len(worker_state.active_requests))

    def _act(self, action: node.Action) -> None:
        if isinstance(action, Grow):
            self._resize(action.count, self.processes.count(), action.reason)
        elif isinstance(action, node.Shrink):
            self._resize(-action.count, self.processes.count(), action.reason)
        elif isinstance(action, GrowReplacement):
            self._grow_replacement(action.job)
        elif isinstance(action, RetireReplaced):
            self._finish_replacement(action.job)
        elif isinstance(action, RequestMaintenance):
            self.request_maintenance()

    def _enqueue(self, job: Replacement) -> None:
        if self.plan.enqueue(job):
            logger.info("node %s: will replace process %d, warm first (%s)", self.node, job.pid, job.reason)

    def _take_requests(self) -> None:
        if self.retire_requests is not None:
            for job in self.retire_requests.take():
                self._enqueue(job)

    def _grow_replacement(self, job: Replacement) -> None:
        global NEXT_SLOT
        if job.pid not in self.pids:
            self.plan.replacing = None  # it died meanwhile: billiard replaces it
            return
        # The new process takes the old one's slot over (it reads NEXT_SLOT after the fork).
        NEXT_SLOT = (job.slot, job.recycles + 1) if job.slot else None
        try:
            job.new_pids = self.processes.grow()
        finally:
            NEXT_SLOT = None
        self.pids |= job.new_pids
        job.grown = True

    def _finish_replacement(self, job: Replacement) -> None:
        """Retire the replaced process, if idle (else at the end of its call), now that its replacement is warm."""
        if not self._replacement_serves(job):
            # Its replacement could not be set up: keep the agent that works, drop the new one.
            logger.warning("node %s: the replacement of process %d failed its setup; keeping it", self.node, job.pid)
            for pid in job.new_pids:
                self.processes.retire(pid)
            self.plan.replacing = None
            return
        name = self._agent_name(job.pid)
        retired = self.processes.retire(job.pid)
        if retired is None:
            return  # busy: retired when its call ends (process_finished)
        self.plan.replacing = None
        if retired:
            registry.count(self.state, self.pool.name, recycles=1)
            logger.info("node %s: process %d replaced, warm first (%s)", self.node, job.pid, job.reason)
            trigger = recycling.trigger_of(job.reason)
            events.emit(events.AgentRecycled(self.pool.name, agent=name, trigger=trigger, reason=job.reason, warm=True))

    def _agent_name(self, pid: int) -> str:
        try:
            return str(self.state.hget(keys.agent(f"{self.pool.name}@{self.hostname}:{pid}"), "name") or pid)
        except redis.RedisError:
            return str(pid)

    def _replacement_serves(self, job: Replacement) -> bool:
        try:
            agent = (keys.agent(f"{self.pool.name}@{self.hostname}:{pid}") for pid in job.new_pids)
            states = [self.state.hget(key, "state") for key in agent]
        except redis.RedisError:
            return True  # cannot tell: the replacement is up, trust it
        return all(state != "failed" for state in states)

    def _resize(self, delta: int, before: int, reason: str) -> int:
        """Grow or shrink by ``delta`` processes (shrinking only idle ones); the change made."""
        if delta > 0:
            self.processes.grow(delta)
        else:
            delta = -self.processes.retire_idle(-delta)
            if not delta:
                return 0  # every process is busy
        after = before + delta
        direction = "up" if delta > 0 else "down"
        logger.info("node %s: %s from %d to %d agents (%s)", self.node, direction, before, after, reason)
        self.on_change(after)
        try:
            registry.record_scale(self.state, self.pool.name, direction, before, after, reason, time.time(), self.node)
        except redis.RedisError:
            logger.warning("could not record the scale event", exc_info=True)
        scaled = events.PoolScaled(
            self.pool.name, node=self.node, direction=direction, before=before, after=after, reason=reason
        )
        events.emit(scaled)
        return delta
