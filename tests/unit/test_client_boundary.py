"""Bad input is refused at the client with a typed error, at once, before anything is sent (no broker needed)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from poolq import AsyncClient, Client, InvalidOption, InvalidPayload, PoolqError, UnknownPool, load_config
from poolq.client import options
from poolq.store.messages import MAX_NESTING
from poolq.testing import render_config


@pytest.fixture
def client(tmp_path: Path) -> Client:
    path = tmp_path / "pools.toml"
    path.write_text(render_config("p", {"agent": "tests.agents:Probe", "max_payload_bytes": 100}))
    # Port 9 (discard) on loopback: anything that tried to connect would fail loudly.
    return Client(load_config(path, env={"POOLQ_BROKER_URL": "redis://127.0.0.1:9/0"}))


def test_unknown_pool(client: Client) -> None:
    with pytest.raises(UnknownPool):
        client.call("nope", 1)
    with pytest.raises(UnknownPool):
        client.cast("nope", 1)


@pytest.mark.parametrize("value", [{1, 2}, b"bytes", object(), float("inf"), float("nan"), complex(1, 2)])
def test_not_json(client: Client, value: object) -> None:
    with pytest.raises(InvalidPayload, match="not plain JSON"):
        client.call("p", value)
    with pytest.raises(InvalidPayload, match="not plain JSON"):
        client.cast("p", key=value)


def test_over_the_size_limit(client: Client) -> None:
    with pytest.raises(InvalidPayload, match="over the limit of 100"):
        client.call("p", "x" * 200)
    client_bytes = "é" * 60  # 60 characters, 120 bytes in UTF-8
    with pytest.raises(InvalidPayload):
        client.cast("p", client_bytes)


def _nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 600, 1000, 100_000])
def test_nesting_deeper_than_the_bound_is_refused(client: Client, depth: int) -> None:
    # Deep enough to break pickling in the node (600) or json itself (1000): a typed error, at once
    with pytest.raises(InvalidPayload, match=f"nest more than {MAX_NESTING} levels"):
        client.call("p", _nested(depth))
    with pytest.raises(InvalidPayload, match=f"nest more than {MAX_NESTING} levels"):
        client.cast("p", key={"a": _nested(depth)})


@pytest.mark.parametrize(
    "bad", [0, -1, True, "3", "5", float("nan"), float("inf"), float("-inf"), 1e308, [1], None.__class__]
)
@pytest.mark.parametrize("option", ["timeout", "call_timeout"])
def test_bad_timeouts_are_typed_errors(client: Client, option: str, bad: object) -> None:
    for send in (client.call, client.cast):
        started = time.monotonic()
        with pytest.raises(InvalidOption, match=option) as caught:
            send("p", **{option: bad})  # type: ignore[arg-type]
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, PoolqError)
        assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("bad", ["3", 0, -2, float("nan"), True])
def test_bad_lease_options_are_typed_errors(client: Client, bad: object) -> None:
    with pytest.raises(InvalidOption, match="timeout"):
        client.lease("p", timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidOption, match="ttl"):
        client.lease("p", ttl=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("op", ["", "no such", "_private", 3, b"handle"])
def test_bad_operation_names(client: Client, op: object) -> None:
    with pytest.raises(InvalidOption, match="op must be"):
        client.call("p", op=op)  # type: ignore[arg-type]


@pytest.mark.parametrize("block", ["yes", 1, None])
def test_block_must_be_a_bool(client: Client, block: object) -> None:
    with pytest.raises(InvalidOption, match="block"):
        client.call("p", block=block)  # type: ignore[arg-type]


def test_pool_must_be_a_string(client: Client) -> None:
    with pytest.raises(InvalidOption, match="named by a string"):
        client.call(["p"])  # type: ignore[arg-type]
    with pytest.raises(InvalidOption):
        client.status(None)  # type: ignore[arg-type]


def test_reserved_keywords_go_through_kwargs(client: Client) -> None:
    # Keywords the client keeps for itself reach the agent through kwargs, merged with the others
    assert options.keywords({"text": "a"}, {"timeout": 3, "op": "x"}) == {"text": "a", "timeout": 3, "op": "x"}
    with pytest.raises(InvalidOption, match="given twice"):
        client.call("p", text="a", kwargs={"text": "b"})
    with pytest.raises(InvalidOption, match="kwargs must be a dict"):
        client.call("p", kwargs=[("a", 1)])  # type: ignore[arg-type]


def test_async_client_refuses_the_same(client: Client) -> None:
    async def run() -> None:
        aclient = AsyncClient(client)
        with pytest.raises(InvalidOption):
            await aclient.call("p", timeout=float("nan"))
        with pytest.raises(InvalidPayload):
            await aclient.call("p", _nested(MAX_NESTING + 1))
        with pytest.raises(InvalidOption):
            aclient.lease("p", timeout="3")  # type: ignore[arg-type]

    asyncio.run(run())


@pytest.mark.parametrize("raw", ["", "not json", "[1]", "{}"])
def test_an_unreadable_lease_message_is_lease_lost(raw: str) -> None:
    from poolq import LeaseLost
    from poolq.store import messages

    with pytest.raises(LeaseLost):
        messages.read_lease_reply(raw, 1, "lease-1") if raw != "{}" else messages.read_lease_grant(raw)


def test_a_blocking_map_inside_an_event_loop_is_a_typed_error(client: Client) -> None:
    import asyncio

    from poolq import BlockingInEventLoop

    async def inside() -> None:
        client.map("echo", ["a"])

    with pytest.raises(BlockingInEventLoop, match="async form"):
        asyncio.run(inside())
