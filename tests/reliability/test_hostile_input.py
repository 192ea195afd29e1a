"""No payload stops a node, whoever sends it; each client entry point gives a result or a typed error.

The client refuses what it can before sending. A message that bypasses the
client (another producer, a hand-made message) is refused by the node itself
before any process gets it; the node serves on.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from poolq import AgentCrashed, AsyncClient, InvalidPayload, PoolqError
from poolq.client import options
from poolq.store import keys, messages, protocol
from poolq.testing import PoolFactory, RunningPool
from tests.reliability.agents import Ledger
from tests.reliability.conftest import AGENT


@pytest.fixture(scope="module")
def pool(module_pools: PoolFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPool]:
    ledger = Ledger(tmp_path_factory.mktemp("hostile") / "ledger.txt")
    yield module_pools.start("hostile", AGENT, size=2, max_payload_bytes=65536, options={"ledger": str(ledger.path)})


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def _send_raw(pool: RunningPool, task_id: str, body: bytes) -> None:
    """Publish a Celery (protocol 2) message with this body, the way any producer could, past poolq's client."""
    headers = {
        "lang": "py", "task": "poolq.hostile", "id": task_id, "root_id": task_id, "parent_id": None,
        "argsrepr": "(...)", "kwargsrepr": "{}", "origin": "test", "retries": 0,
        protocol.HEADER_REPLY: keys.reply(task_id), protocol.HEADER_OP: "echo",
    }  # fmt: skip
    with pool.client.app.producer_or_acquire() as producer:
        producer.publish(
            body, routing_key="poolq.hostile", exchange="", content_type="application/json",
            content_encoding="utf-8", headers=headers, correlation_id=task_id,
        )  # fmt: skip


@pytest.mark.parametrize("depth", [150, 600, 5000])
def test_a_deep_payload_that_bypasses_the_client_is_refused_by_the_node(pool: RunningPool, depth: int) -> None:
    args = "[" * depth + '"leaf"' + "]" * depth  # one argument, nested ``depth`` deep
    for n in range(3):  # as a stream of casts: each is refused, none comes back
        task_id = f"deep-{depth}-{n}"
        _send_raw(pool, task_id, f"[[{args}], {{}}, {{}}]".encode())
        reply = pool.client.scripts.pop(keys.reply(task_id), time.monotonic() + 10)
        assert reply is not None
        with pytest.raises(InvalidPayload, match=r"nest more than|cannot be decoded"):
            messages.decode_reply(reply)
    assert all(w.process.poll() is None for w in pool.workers)  # the node lives
    assert pool.client.call("hostile", 1, 2, op="echo") == {"args": [1, 2], "kwargs": {}}


def test_a_message_that_is_not_json_does_not_stop_the_node(pool: RunningPool) -> None:
    _send_raw(pool, "garbled", b"{not json at all")
    pool.wait_for(lambda: pool.client.state.llen("poolq.hostile") == 0, timeout=10, what="message consumed")
    assert all(w.process.poll() is None for w in pool.workers)
    assert pool.client.call("hostile", "ok", op="echo") == {"args": ["ok"], "kwargs": {}}


# Plain JSON (unicode of every plane, lone surrogates included, big integers),
# and anything at all: what JSON cannot carry (NaN, infinities, bytes, sets,
# non-string keys), nested to the bound and past it.
_json = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    ),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=5), kids, max_size=4)),
    max_leaves=20,
)  # fmt: skip
_anything = st.recursive(
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.binary(max_size=8), _json),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers(), st.none()), children, max_size=4),
        st.frozensets(st.integers(), max_size=3),
    ),
    max_leaves=20,
)
_values = st.one_of(_json, _json, _json, _anything, st.integers(98, 103).map(_nested))
_bad_seconds = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**9), st.booleans(), st.text(max_size=3)
)
# Mostly sound timeouts, so that most calls reach an agent; the rest anything at all.
_seconds = st.one_of(st.none(), st.floats(0.5, 5), st.none(), st.floats(0.5, 5), st.none(), _bad_seconds)
_calls = st.fixed_dictionaries(
    {
        "args": st.lists(_values, max_size=3),
        "kwargs": st.dictionaries(st.text(min_size=1, max_size=6), _values, max_size=3),
        "op": st.sampled_from(["echo", "echo", "echo", None, "nope", "_private", "", "echo "]),
        "timeout": _seconds,
        "call_timeout": _seconds,
        "entry": st.sampled_from(["call", "cast", "acall", "lease"]),
    }
)


def _attempt(pool: RunningPool, aclient: AsyncClient, call: dict[str, Any]) -> Any:
    options = {k: call[k] for k in ("op", "timeout", "call_timeout")}
    bounded = {**options, "timeout": _small(call["timeout"]), "call_timeout": _small(call["call_timeout"])}
    args, kwargs = call["args"], {f"k_{k}": v for k, v in call["kwargs"].items()}
    if call["entry"] == "call":
        return pool.client.call("hostile", *args, **bounded, **kwargs)
    if call["entry"] == "cast":
        return pool.client.cast("hostile", *args, **bounded, **kwargs).result(timeout=30)
    if call["entry"] == "acall":

        async def in_a_loop() -> Any:
            try:
                return await aclient.call("hostile", *args, **bounded, **kwargs)
            finally:
                await aclient.aclose()  # this loop's connection goes with it

        return asyncio.run(in_a_loop())
    with pool.client.lease("hostile", timeout=bounded["timeout"]) as agent:
        return agent.call(*args, op=call["op"], call_timeout=bounded["call_timeout"], **kwargs)


def _small(value: Any) -> Any:
    """Keep valid timeouts short (the test must end); pass every invalid one through as it is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return min(value, 5.0) if value <= options.MAX_SECONDS else value
    return value


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(_calls, min_size=1, max_size=5))
def test_fuzzed_calls_get_a_result_or_a_typed_error(pool: RunningPool, calls: list[dict[str, Any]]) -> None:
    aclient = AsyncClient(pool.client)
    for call in calls:
        try:
            _attempt(pool, aclient, call)
            event("answered")
        except PoolqError as exc:  # a typed error is a fine answer to a bad call
            assert not isinstance(exc, AgentCrashed), f"a payload killed an agent's process: {call!r}"
            event(f"{type(exc).__name__} {getattr(exc, 'remote_type', '')}".strip())
    # After each batch the node lives and a normal call works
    assert all(w.process.poll() is None for w in pool.workers)
    assert pool.client.call("hostile", "after", op="echo", timeout=10) == {"args": ["after"], "kwargs": {}}
