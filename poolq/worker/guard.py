"""What a worker node does with a call's message before one of its processes gets it.

Celery's task strategy turns a message into a request and hands it to the
execution pool. poolq's strategy (``PoolTask.Strategy``) looks first, in the
node's main process:

- **A payload no agent must see**: bigger than the pool's limit, nested
  deeper than :data:`~poolq.store.messages.MAX_NESTING`, or not JSON at all. Such a
  message could not even be handed to a prefork child (pickling it exhausts
  the stack and takes the node down) and would come back after every crash.
  It is answered with ``InvalidPayload``, acknowledged and dropped, whoever
  sent it (poolq's client refuses it before sending).
- **A redelivered copy** (the broker's ``redelivered`` flag): its claim says
  whether the call's first run ended (done, or given up by its caller: the
  copy is acknowledged and dropped), is alive (the copy is *held*: kept
  unacknowledged, so the broker still has it should that run die, and looked
  at again every :data:`HOLD_RECHECK` seconds), or died (the copy goes on to
  an agent, which takes the call over).

Acknowledging a held copy while its first run lives would be wrong with
Redis: both copies share one delivery tag, and the acknowledgement would
remove the only record that lets the broker hand the call on if that run dies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy

from .. import events
from ..errors import InvalidPayload
from ..store import connection, keys, messages, protocol
from .runtime import owner_alive

logger = logging.getLogger("poolq.worker")

#: Seconds between two looks at the claim of a held copy.
HOLD_RECHECK = 1.0
#: Bytes a message body may exceed the pool's max_payload_bytes by (Celery's envelope).
ENVELOPE_BYTES = 4096

RUN, DROP, HOLD = "run", "drop", "hold"


@dataclass
class Held:
    """A redelivered copy kept back while its call's first run lives."""

    message: Any
    resume: Callable[[], None]
    qos: Any


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """``PoolTask.Strategy``: Celery's default strategy behind poolq's look at each message."""
    handle: Callable[..., Any] = default_strategy(task, app, consumer, **kwargs)
    from .step import current_node

    node = current_node()
    if node is None:  # not a pool's node (the maintainer never gets pool calls)
        return handle
    guard = Guard(node.state, node.pool.name, node.pool.max_payload_bytes, node.hostname, consumer)
    batcher = _batcher(node, consumer)

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **extra: Any) -> Any:
        def resume() -> Any:
            if batcher is not None and batcher.takes(message):
                return batcher.add(message)  # a call of a @batched operation waits for its batch
            return handle(message, body, ack, reject, callbacks, **extra)

        if guard.admit(message, resume):
            return resume()
        return None

    return on_message


def _batcher(node: Any, consumer: Any) -> Any:
    """The node's batch buffers, when its agents have ``@batched`` operations (else None)."""
    from .batching import Batcher

    if not node.batched:
        return None
    scaler = node.scaler
    return Batcher(
        node.batched, consumer.pool, consumer.timer, tuple(consumer.connection_errors),
        on_finished=scaler.process_finished if scaler is not None else None,
    )  # fmt: skip


class Guard:
    """The checks above, for one consumer of one node."""

    def __init__(self, state: redis.Redis, pool: str, max_payload_bytes: int, hostname: str, consumer: Any) -> None:
        self.state = state
        self.pool = pool
        self.max_payload_bytes = max_payload_bytes
        self.hostname = hostname
        self.consumer = consumer
        self.scripts = connection.Scripts(state)

    def admit(self, message: Any, resume: Callable[[], None]) -> bool:
        """True when the message goes on to an agent now; otherwise it was dropped or is held."""
        problem = self.payload_problem(message)
        if problem:
            self.refuse(message, problem)
            return False
        if not message.delivery_info.get("redelivered"):
            return True
        verdict = self.verdict(message)
        if verdict == DROP:
            message.ack()
            return False
        if verdict == HOLD:
            self.hold(Held(message, resume, self.consumer.qos))
            return False
        return True

    def payload_problem(self, message: Any) -> str:
        """Why no agent may get this message ('' when it may)."""
        body = message.body
        if len(body) > self.max_payload_bytes + ENVELOPE_BYTES:
            return f"the message is {len(body)} bytes, over the pool's limit of {self.max_payload_bytes}"
        raw = body if isinstance(body, bytes) else str(body).encode()
        if raw.count(b"[") + raw.count(b"{") <= messages.MAX_NESTING:
            return ""  # too few brackets to nest too deep: no need to walk it
        try:
            payload = message.payload
        except (Exception, RecursionError) as exc:
            return f"the message cannot be decoded: {type(exc).__name__}"
        if messages.argument_nesting(payload) > messages.MAX_NESTING:
            return f"its arguments nest more than {messages.MAX_NESTING} levels deep"
        return ""

    def refuse(self, message: Any, problem: str) -> None:
        headers = message.headers or {}
        task_id = str(headers.get("id", ""))
        logger.error("refusing call %s: %s", task_id, problem)
        refused = InvalidPayload(f"call {task_id}: {problem}")
        error = messages.encode_error(task_id, refused, "")
        op = str(headers.get(protocol.HEADER_OP) or "handle")
        events.emit(
            events.CallFailed(
                self.pool, op=op, agent="", task_id=task_id, duration_s=0.0, kind=refused.kind,
                error_type="InvalidPayload", message=problem, ran=False,
            )
        )  # fmt: skip
        try:
            reply_to = str(headers.get(protocol.HEADER_REPLY) or keys.reply(task_id))
            protocol.finish(
                self.scripts, task_id, error, reply_to, "", keys.stats(self.pool), 0, False, 0.0,
                result=str(headers.get(protocol.HEADER_RESULT) or ""), retry_until=None,
            )  # fmt: skip
        except redis.RedisError:
            logger.warning("could not tell the caller of %s why its call was refused", task_id)
        message.ack()

    def verdict(self, message: Any) -> str:
        """What to do with a redelivered copy, from its call's claim."""
        task_id = str((message.headers or {}).get("id", ""))
        try:
            owner = self.state.hget(keys.claim(task_id), "owner")
        except redis.RedisError:
            return RUN  # the agent's own claim decides (and waits out the outage)
        if owner is None:
            return RUN  # never started: an agent takes it
        if owner in protocol.CLOSED:
            return DROP
        return HOLD if owner_alive(self.state, self.hostname, str(owner)) else RUN

    def hold(self, held: Held) -> None:
        if held.qos is self.consumer.qos:
            # Like an ETA task: the held copy must not use up the node's prefetch.
            held.qos.increment_eventually()
        logger.info("holding back a copy of call %s: its first run is alive", (held.message.headers or {}).get("id"))
        self.consumer.timer.call_after(HOLD_RECHECK, self.recheck, (held,))

    def recheck(self, held: Held) -> None:
        message = held.message
        if message.acknowledged or getattr(message.channel, "connection", None) is None:
            return  # its channel closed: the broker took the copy back
        verdict = self.verdict(message)
        if verdict == HOLD:
            self.consumer.timer.call_after(HOLD_RECHECK, self.recheck, (held,))
            return
        if held.qos is self.consumer.qos:
            held.qos.decrement_eventually()
        if verdict == DROP:
            message.ack()
        else:
            held.resume()


class PoolRequest(Request):  # type: ignore[misc]
    """``PoolTask.Request``: tells the node when one of its processes finished a call.

    The node retires a process that asked to go (see
    :class:`~poolq.worker.scaler.RetireRequests`) at that moment, while it is
    idle, before Celery writes it another call.
    """

    def acknowledge(self) -> None:
        super().acknowledge()
        self._finished()

    def reject(self, requeue: bool = False) -> None:
        super().reject(requeue=requeue)
        self._finished()

    def _finished(self) -> None:
        from .step import current_node

        node = current_node()
        if node is not None and node.scaler is not None and self.worker_pid:
            node.scaler.process_finished(int(self.worker_pid))
