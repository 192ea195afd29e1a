"""What a call's reply and a lease's messages say, and which arguments may travel at all."""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from typing import Any

from .. import errors

#: Deepest nesting of lists and objects accepted in arguments (deeper ones could
#: exhaust the interpreter's stack where the message is decoded or handed on).
MAX_NESTING = 100

#: The errors a reply can carry, by their kind.
_ERROR_KINDS = errors.PoolqError.by_kind()


def nesting(value: Any, limit: int = MAX_NESTING) -> int:
    """How deep lists and dicts nest in ``value`` (0 for a scalar), without recursion.

    Stops counting once past ``limit``.
    """
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def argument_nesting(body: Any) -> int:
    """The nesting of the deepest argument in a message body (``[args, kwargs, ...]``)."""
    return max(0, nesting(body, MAX_NESTING + 2) - 2)


def check_arguments(pool: str, args: Any, kwargs: Any, max_bytes: int) -> int:
    """The size of the arguments as JSON, once they are found plain JSON, not too deep nor too big.

    Raises:
        InvalidPayload
    """
    if argument_nesting([args, kwargs]) > MAX_NESTING:
        raise errors.InvalidPayload(
            f"arguments for pool {pool!r} nest more than {MAX_NESTING} levels deep (lists and objects)"
        )
    try:
        body = json.dumps([args, kwargs], allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise errors.InvalidPayload(f"arguments for pool {pool!r} are not plain JSON: {exc}") from None
    size = len(body.encode())
    if size > max_bytes:
        raise errors.InvalidPayload(
            f"arguments for pool {pool!r} are {size} bytes, over the limit of {max_bytes} (max_payload_bytes)"
        )
    return size


def encode_result(task_id: str, result: Any) -> str:
    """The reply for a successful call. Raises TypeError/ValueError if not plain JSON."""
    if nesting(result) > MAX_NESTING:
        raise ValueError(f"the result nests more than {MAX_NESTING} levels deep")
    return json.dumps({"id": task_id, "ok": result}, allow_nan=False, separators=(",", ":"))


def error_kind(exc: BaseException) -> str:
    """The kind a failed call's reply carries: poolq's errors have their own; any other is the agent's."""
    return exc.kind if isinstance(exc, errors.PoolqError) and exc.kind else "agent"


def encode_error(task_id: str, exc: BaseException, remote_traceback: str | None = None) -> str:
    """The reply for a failed call: the error's kind (any exception but poolq's is the agent's), type and traceback.

    ``remote_traceback``: the traceback to send; None formats ``exc``'s own.
    """
    kind = error_kind(exc)
    remote_type = type(exc).__qualname__
    module = type(exc).__module__
    message = str(exc)
    if isinstance(exc, errors.AgentError):
        # Already the remote side's description (AgentCrashed: WorkerLost).
        remote_type, message = exc.remote_type, exc.message
    elif module not in ("builtins", "__main__"):
        remote_type = f"{module}.{remote_type}"
    if remote_traceback is None:
        remote_traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    error = {"kind": kind, "type": remote_type, "message": message, "traceback": remote_traceback}
    return json.dumps({"id": task_id, "error": error}, separators=(",", ":"))


def decode_reply(raw: str) -> Any:
    """The result in a reply, or the typed error it carries, raised."""
    return result_of(json.loads(raw))


def result_of(document: dict[str, Any]) -> Any:
    """The result in a parsed reply, or the typed error it carries, raised."""
    if "ok" in document:
        return document["ok"]
    raise error_from(document["error"])


def error_from(error: dict[str, str]) -> errors.PoolqError:
    """The client-side exception for a reply's error document."""
    cls = _ERROR_KINDS.get(error["kind"], errors.AgentError)
    if issubclass(cls, errors.AgentError):
        return cls(error["type"], error["message"], error.get("traceback", ""))
    return cls(error["message"])


# -- leases: what the client and the agent say on the lease's two lists -------


@dataclass(frozen=True)
class LeaseRequest:
    """One message on a lease's request list (client to agent): a call, or the release."""

    seq: int = 0
    op: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    call_timeout: float = 0.0
    release: bool = False
    broken: bool = False
    #: Seconds the call may wait for a slot of the pool's rate limit (the lease's timeout; 0: the pool's).
    wait: float = 0.0

    def encode(self) -> str:
        if self.release:
            return json.dumps({"release": True, "broken": self.broken})
        call = {"seq": self.seq, "op": self.op, "args": self.args, "kwargs": self.kwargs}
        return json.dumps({**call, "call_timeout": self.call_timeout, "wait": self.wait})

    @classmethod
    def decode(cls, raw: str) -> LeaseRequest:
        message = json.loads(raw)
        if "release" in message:
            return cls(release=True, broken=bool(message.get("broken")))
        return cls(
            seq=int(message["seq"]),
            op=message.get("op"),
            args=list(message.get("args", [])),
            kwargs=dict(message.get("kwargs", {})),
            call_timeout=float(message.get("call_timeout") or 0),
            wait=float(message.get("wait") or 0),
        )


def lease_grant(agent_id: str, name: str) -> str:
    """The agent's first message on the reply list: it serves the lease."""
    return json.dumps({"granted": agent_id, "name": name})


def lease_ended(reason: str, message: str = "") -> str:
    """The agent's last message on the reply list: the lease ended (it could not start, or a call broke it)."""
    return json.dumps({"ended": reason, "message": message})


def lease_reply(seq: int, reply: str) -> str:
    """The reply to lease call ``seq`` (a call's reply, numbered)."""
    return json.dumps({**json.loads(reply), "seq": seq})


def read_lease_grant(raw: str) -> tuple[str, str]:
    """The (agent id, name) that took the lease.

    Raises:
        AgentUnavailable: the agent could not be set up; or the worker's error reply.
    """
    document = _lease_message(raw)
    if "ended" in document:
        raise errors.AgentUnavailable(document.get("message", "") or document["ended"])
    if "granted" not in document:
        if "error" in document:
            result_of(document)  # the worker's error reply: raises it
        raise errors.LeaseLost(f"the lease's grant is not one: {raw[:200]!r}")
    return str(document["granted"]), str(document.get("name", ""))


def read_lease_reply(raw: str, seq: int, lease_id: str) -> tuple[bool, Any]:
    """Read a message of the reply list: (False, None) when it answers an earlier call, else (True, result).

    Raises:
        LeaseLost: the lease ended; the error the reply carries.
    """
    document = _lease_message(raw)
    if "ended" in document:
        raise errors.LeaseLost(f"lease {lease_id} ended: {document['ended']}")
    if document.get("seq", seq) != seq:
        return False, None  # a late reply to an earlier call that timed out
    return True, result_of(document)


def _lease_message(raw: str) -> dict[str, Any]:
    """A message of a lease's reply list, parsed; one that is not is a lost lease (typed, not a JSON error)."""
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise errors.LeaseLost(f"a lease message that poolq cannot read: {raw[:200]!r}")
    return document
