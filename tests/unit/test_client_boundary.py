"""Bad input is refused at the client, before anything is sent (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from poolq import Client, InvalidPayload, UnknownPool, load_config
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


@pytest.mark.parametrize("value", [{1, 2}, b"bytes", object(), float("inf"), complex(1, 2)])
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


@pytest.mark.parametrize("bad", [0, -1, "5", True])
def test_timeouts_must_be_positive_numbers(client: Client, bad: object) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        client.call("p", timeout=bad)  # type: ignore[arg-type]
