"""Dynamic batching: the calls of a ``@poolq.batched`` operation, gathered into one agent invocation.

Two halves, as in celery-batches (clokep/celery-batches), whose task strategy
buffers requests in the consumer and hands the pool one job per batch:

- **In the node's main process** (:class:`Batcher`, called by the task
  strategy, :mod:`poolq.worker.guard`): a message of a batched operation is
  not handed to Celery's request machinery but kept, unacknowledged, in a
  buffer per operation. The buffer goes to a process as one job when it holds
  ``max_size`` calls, or ``max_wait`` seconds after its first call arrived,
  as soon as a process is free of batches. The node's prefetch is raised to
  ``2 x max_size`` per process (:func:`prefetch_multiplier`), so a batch can
  form while the previous one runs. Its messages are acknowledged when the
  job returns (late, like every poolq call); a process that dies during the
  job (``WorkerLostError``) sends every message of the batch back to the
  queue (``task_reject_on_worker_lost``).
- **In the process** (:func:`run_batch`): every call is claimed (a call
  already done, expired or given up by its caller is skipped; a timed-out or
  poison one is answered, as for a single call), the operation runs once with
  the items of the claimed calls, and each caller gets its own reply.

A redelivered call (its batch's process died) runs in a batch of its own: a
call that kills its process fails alone (``AgentCrashed`` after
``max_deliveries``), and the others of its first batch complete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import redis
from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import Terminated, WorkerLostError
from celery.exceptions import Ignore, Reject

from .. import events
from ..agent import Agent, BatchSpec, batch_item, batch_results
from ..errors import (
    AgentUnavailable,
    CallTimeout,
    CheckoutTimeout,
    InvalidArguments,
    PoolqError,
    UnknownOperation,
)
from ..store import protocol
from . import limits
from .runtime import Call, Runtime, admit, after_raise, answer, current, fail, take_rate_slot

logger = logging.getLogger("poolq.worker")

#: What the main process does with a message once its batch returned.
ACK, REQUEUE = "ack", "requeue"
#: Batches that may form per process while one runs: the node's prefetch is this times max_size per process.
PREFETCH_BATCHES = 2


def prefetch_multiplier(agent_class: type[Agent], current_multiplier: int) -> int:
    """The prefetch multiplier of a node whose agents are ``agent_class``: enough to fill its batches."""
    specs = agent_class.batched_operations()
    if not specs:
        return current_multiplier
    return max(current_multiplier, PREFETCH_BATCHES * max(spec.max_size for spec in specs.values()))


# -- the node's main process -------------------------------------------------


@dataclass
class Waiting:
    """A call's message kept in a batch buffer."""

    message: Any
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """The batch buffers of one node's consumer, and the batches its processes run.

    Parameters:
        specs: the batched operations of the pool's agent.
        pool: Celery's execution pool (``apply_async`` runs a job in a process).
        timer: the consumer's timer (``call_after``).
        connection_errors: what an acknowledgement may raise when the broker is gone.
        on_finished: told the pid of a process that finished a batch (the node's scaler).
    """

    def __init__(
        self,
        specs: dict[str, BatchSpec],
        pool: Any,
        timer: Any,
        connection_errors: tuple[type[BaseException], ...] = (),
        on_finished: Callable[[int], None] | None = None,
    ) -> None:
        self.specs = specs
        self.pool = pool
        self.timer = timer
        self.connection_errors = connection_errors
        self.on_finished = on_finished
        self.buffers: dict[str, list[Waiting]] = {op: [] for op in specs}
        self.in_flight = 0
        # Batches end in the pool's result thread (threads pool) or inline (solo).
        self.lock = threading.RLock()

    def takes(self, message: Any) -> bool:
        """Whether the message is a call of a batched operation (a lease request never is)."""
        headers = message.headers or {}
        return str(headers.get(protocol.HEADER_OP) or "") in self.specs and not headers.get(protocol.HEADER_LEASE)

    def add(self, message: Any) -> None:
        """Keep the call's message for its operation's next batch."""
        op = str(message.headers[protocol.HEADER_OP])
        if message.delivery_info.get("redelivered"):
            # Its batch's process died: run it alone, so a poison call fails alone.
            with self.lock:
                self.in_flight += 1
            self._dispatch(op, [Waiting(message)])
            return
        with self.lock:
            buffer = self.buffers[op]
            buffer.append(Waiting(message))
            first = len(buffer) == 1
        if first:
            self.timer.call_after(self.specs[op].max_wait, self.flush_due)
        self.flush_due()

    def capacity(self) -> bool:
        return self.in_flight < max(1, int(self.pool.num_processes or 1))

    def flush_due(self) -> None:
        """Hand out every batch that is full or has waited ``max_wait``, while processes are free."""
        while True:
            with self.lock:
                taken = self._take_due(time.monotonic())
                if taken is None:
                    return
                self.in_flight += 1
            self._dispatch(*taken)

    def _take_due(self, now: float) -> tuple[str, list[Waiting]] | None:
        if not self.capacity():
            return None  # flushed again when a batch returns
        for op, buffer in self.buffers.items():
            if not buffer:
                continue
            spec = self.specs[op]
            if len(buffer) >= spec.max_size or now - buffer[0].arrived >= spec.max_wait:
                batch, self.buffers[op] = buffer[: spec.max_size], buffer[spec.max_size :]
                if self.buffers[op]:
                    self.timer.call_after(max(0.0, spec.max_wait - (now - self.buffers[op][0].arrived)), self.flush_due)
                return op, batch
        return None

    def _dispatch(self, op: str, batch: list[Waiting]) -> None:
        items = [_item(w.message) for w in batch]
        state: dict[str, int] = {}

        def accepted(pid: int, *_: Any) -> None:
            state["pid"] = pid

        def returned(dispositions: Any) -> None:
            if not isinstance(dispositions, list):
                failed(dispositions)  # the threads and solo pools report a lost job here
                return
            for index, waiting in enumerate(batch):
                self._settle(waiting.message, dispositions[index] if index < len(dispositions) else ACK)
            self._done(state.get("pid"))

        def failed(info: Any) -> None:
            exc = getattr(info, "exception", info)
            exc = getattr(exc, "exc", exc) if isinstance(exc, ExceptionWithTraceback) else exc
            # Its process died (or was ended): every call goes back to the queue, and the
            # claims decide what runs again. Any other failure left its calls claimed by a
            # live agent: a copy sent back would be held; its callers hear their timeouts.
            lost = isinstance(exc, (WorkerLostError, Terminated))
            if lost:
                logger.warning("the process running a batch of %s (%d calls) died: %s", op, len(batch), exc)
            else:
                logger.error("a batch of %s (%d calls) failed: %r", op, len(batch), exc)
            for waiting in batch:
                self._settle(waiting.message, REQUEUE if lost else ACK)
            self._done(state.get("pid"))

        try:
            self.pool.apply_async(
                run_batch, args=(op, items), accept_callback=accepted, callback=returned, error_callback=failed
            )
        except Exception:
            logger.exception("could not hand a batch of %s to a process; its calls go back to the queue", op)
            for waiting in batch:
                self._settle(waiting.message, REQUEUE)
            self._done(None)

    def _settle(self, message: Any, disposition: str) -> None:
        if message.acknowledged:
            return
        if disposition == REQUEUE:
            message.reject_log_error(logger, self.connection_errors, requeue=True)
        else:
            message.ack_log_error(logger, self.connection_errors)

    def _done(self, pid: int | None) -> None:
        with self.lock:
            self.in_flight -= 1
        if pid and self.on_finished is not None:
            self.on_finished(pid)
        self.flush_due()


def _item(message: Any) -> dict[str, Any]:
    """What a process needs of a call's message (picklable): its id, poolq headers and arguments."""
    headers = message.headers or {}
    args, kwargs, _embed = message.decode()
    return {
        "id": str(headers.get("id", "")),
        "headers": {k: v for k, v in headers.items() if isinstance(k, str) and k.startswith("poolq_")},
        "args": list(args or ()),
        "kwargs": dict(kwargs or {}),
    }


# -- a worker process ----------------------------------------------------------


@dataclass
class Item:
    """One call of a batch in the process that runs it."""

    index: int
    call: Call
    args: list[Any]
    kwargs: dict[str, Any]
    #: The item the operation gets (the call's one positional argument).
    value: Any = None


def run_batch(op: str, items: list[dict[str, Any]]) -> list[str]:
    """Run one batch of operation ``op`` on an agent of this process; each message's disposition."""
    runtime = current()
    if runtime is None:
        raise RuntimeError("poolq: this worker process hosts no agent (is it started by `poolq worker POOL`?)")
    with runtime.host.checkout() as slot:
        dispositions = [ACK] * len(items)
        admitted: list[Item] = []
        for index, item in enumerate(items):
            call = Call.from_request(SimpleNamespace(id=item["id"], **item["headers"]))
            try:
                call.delivery = admit(runtime, slot, call)
            except Ignore:
                continue  # done already, or given up by its caller
            except Reject:
                dispositions[index] = REQUEUE  # its first run is alive: the node holds this copy back
                continue
            except PoolqError:
                continue  # answered by the claim: a poison call, one past its deadline, ...
            except redis.RedisError:
                logger.warning("call %s: the state Redis is unreachable; back to the queue", call.task_id)
                dispositions[index] = REQUEUE
                continue
            admitted.append(Item(index, call, item["args"], item["kwargs"]))
        if admitted:
            try:
                _run(runtime, slot, op, admitted)
            except Exception:
                # Only the state Redis, gone for longer than STATE_RETRY, gets here: the
                # calls stay claimed, their callers hear their timeouts (as for a single call).
                logger.exception("a batch of %s (%d calls) could not be answered", op, len(admitted))
        return dispositions


def _run(runtime: Runtime, slot: Any, op: str, batch: list[Item]) -> None:
    """Invoke the operation once for the claimed calls; answer each of them."""
    try:
        agent = runtime.host.ensure_ready(slot)
        method = getattr(agent, op, None)
        if op not in agent.batched_operations() or method is None:
            raise UnknownOperation(f"agent {type(agent).__name__} has no batched operation {op!r}")
    except (AgentUnavailable, UnknownOperation) as exc:
        for item in batch:
            fail(runtime, slot, item.call, exc)
        return
    ready: list[Item] = []
    for item in batch:
        try:
            item.value = batch_item(type(agent), op, item.args, item.kwargs)
        except InvalidArguments as exc:
            fail(runtime, slot, item.call, exc)
            continue
        if not take_rate_slot(runtime, item.call):
            fail(runtime, slot, item.call, CheckoutTimeout(f"call {item.call.task_id} got no rate_limit slot in time"))
            continue
        ready.append(item)
    if not ready:
        return
    served = runtime.pool.name
    slot.requests += len(ready)
    slot.last_used_at = time.time()
    started = time.monotonic()
    for item in ready:
        item.call.started = started
        queued = max(0.0, time.time() - item.call.sent) if item.call.sent is not None else 0.0
        events.emit(events.CallStarted(served, op=op, agent=slot.name, task_id=item.call.task_id, queued_s=queued))
    # One invocation serves them all: it may run as long as the least patient caller allows.
    timeouts = [i.call.call_timeout for i in ready if i.call.call_timeout]
    limit = min(timeouts) if timeouts else None
    timeout = CallTimeout(f"a batch of {len(ready)} calls of {op} ran past its call_timeout")

    def fail_all(exc: BaseException, **how: Any) -> None:
        for item in ready:
            fail(runtime, slot, item.call, exc, ran=True, **how)

    try:
        with limits.limit(
            limit, limits.CallDeadline, lambda: fail_all(timeout, agent_state="stopped"),
            f"a batch of {op}", hard=runtime.hard_limits,
        ):  # fmt: skip
            results = batch_results(op, method([item.value for item in ready]), len(ready))
    except limits.CallDeadline:
        fail_all(timeout, agent_state="recycling")
        runtime.host.recycle(slot, "call_timeout: interrupted mid-operation")
        return
    except Exception as exc:
        fail_all(exc, with_traceback=True)
        after_raise(runtime, slot, exc)
        return
    for item, result in zip(ready, results, strict=True):
        # Each caller gets its own result, or its own error (an Exception instance in its position).
        if isinstance(result, BaseException):
            fail(runtime, slot, item.call, result, with_traceback=True, ran=True)
        else:
            answer(runtime, slot, item.call, result)
    runtime.host.after_call(slot)
