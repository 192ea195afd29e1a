"""The sync and async clients run the same steps (poolq.client.core): no behaviour differs between them.

Each case runs through ``call``/``lease`` and ``acall``/``alease`` alike:
a closed or degraded pool refuses at once, a lost state Redis is a typed
``BrokerUnavailable``, and the async client never blocks its event loop on
Redis.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from poolq import AsyncClient, BrokerUnavailable, Client, PoolClosed, PoolDegraded, load_config
from poolq.store import keys
from poolq.testing import render_config


@pytest.fixture
def client(tmp_path: Path, poolq_broker: str, state: redis.Redis) -> Iterator[Client]:
    """A client of pool ``p``, with no node running: every refusal here comes before any agent."""
    path = tmp_path / "pools.toml"
    path.write_text(render_config("p", {"agent": "tests.agents:Probe"}))
    state.delete(keys.stats("p"))
    client = Client(load_config(path, env={"POOLQ_BROKER_URL": poolq_broker}))
    yield client
    state.delete(keys.stats("p"))
    client.close()


def _in_loop(client: Client, use: Callable[[AsyncClient], Awaitable[Any]]) -> Any:
    """Run ``use`` with an async client on a new event loop, and close the client's connections."""

    async def main() -> Any:
        aclient = AsyncClient(client)
        try:
            return await use(aclient)
        finally:
            await aclient.aclose()

    return asyncio.run(main())


#: The entry points every case runs through.
ENTRIES = ["call", "acall", "lease", "alease"]


def _entry(client: Client, name: str) -> Callable[[], Any]:
    """Entry point ``name`` of ``client`` (sync or async), as a plain call to pool ``p``."""

    async def alease(aclient: AsyncClient) -> None:
        async with aclient.lease("p", timeout=1):
            pass

    def sync_lease() -> None:
        with client.lease("p", timeout=1):
            pass

    return {
        "call": lambda: client.call("p", timeout=1),
        "acall": lambda: _in_loop(client, lambda aclient: aclient.call("p", timeout=1)),
        "lease": sync_lease,
        "alease": lambda: _in_loop(client, alease),
    }[name]


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_closed_pool_refuses_every_entry_point_at_once(client: Client, state: redis.Redis, entry: str) -> None:
    state.hset(keys.stats("p"), "closed", "now")
    client.gate.forget("p")
    started = time.monotonic()
    with pytest.raises(PoolClosed):
        _entry(client, entry)()
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_degraded_pool_refuses_every_entry_point_at_once(client: Client, state: redis.Redis, entry: str) -> None:
    state.hset(
        keys.stats("p"),
        mapping={"breaker": "open", "breaker_until": time.time() + 60, "breaker_error": "boom"},
    )
    client.gate.forget("p")
    with pytest.raises(PoolDegraded, match="boom"):
        _entry(client, entry)()


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_lost_state_redis_is_broker_unavailable_for_every_entry_point(tmp_path: Path, entry: str) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(render_config("p", {"agent": "tests.agents:Probe"}))
    # Nothing listens on port 9: broker and state Redis are both away
    client = Client(load_config(path, env={"POOLQ_BROKER_URL": "redis://127.0.0.1:9/0"}))
    try:
        client.gate.forget("p")
        with pytest.raises(BrokerUnavailable):
            _entry(client, entry)()
    finally:
        client.close()


def test_acall_never_blocks_its_event_loop_on_redis(client: Client, state: redis.Redis) -> None:
    # Given a closed pool (so the call stops after its admission, which reads the pool's state)
    state.hset(keys.stats("p"), "closed", "now")
    loop_threads: set[int] = set()
    original = redis.Redis.execute_command

    def recording(self: redis.Redis, *args: Any, **options: Any) -> Any:
        loop_threads.add(threading.get_ident())
        return original(self, *args, **options)

    async def closed_call(aclient: AsyncClient) -> int:
        with pytest.raises(PoolClosed):
            await aclient.call("p")
        return threading.get_ident()

    redis.Redis.execute_command = recording  # type: ignore[method-assign]
    try:
        # The patch is in effect: a blocking command of this client's state Redis is recorded
        client.state.ping()
        assert loop_threads == {threading.get_ident()}
        loop_threads.clear()
        loop_thread = _in_loop(client, closed_call)
    finally:
        redis.Redis.execute_command = original  # type: ignore[method-assign]
    assert loop_thread not in loop_threads  # no blocking Redis command ran on the loop
