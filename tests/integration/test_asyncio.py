"""F9, F24: asyncio calls and leases without a thread per waiting call; map, and waiting for quiescence."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from poolq import AgentError, AsyncClient, CheckoutTimeout, InvalidArguments
from poolq.testing import PoolFactory, RunningPool


@pytest.fixture(scope="module")
def pool(module_pools: PoolFactory, poolq_broker: str) -> Iterator[RunningPool]:
    yield module_pools.start("aio", "tests.agents:Probe", size=4, options={"redis_url": poolq_broker})


def test_a_thousand_concurrent_acalls_from_one_event_loop(pool: RunningPool) -> None:
    n = 1000
    threads_seen = []

    async def main() -> list[Any]:
        aclient = AsyncClient(pool.client)

        async def watch() -> None:
            while True:
                threads_seen.append(threading.active_count())
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*(aclient.call("aio", i, 1, op="add", timeout=60) for i in range(n)))
        finally:
            watcher.cancel()
            await aclient.aclose()

    baseline = threading.active_count()
    started = time.perf_counter()
    results = asyncio.run(main())
    wall = time.perf_counter() - started
    assert results == [i + 1 for i in range(n)]
    # No thread per waiting call: a fixed handful of sender threads at most
    assert max(threads_seen) <= baseline + 4 + 1
    print(f"\n{n} concurrent acalls: {wall:.2f}s, {n / wall:.0f} calls/s")


def test_acall_errors_are_the_typed_ones(pool: RunningPool) -> None:
    async def main() -> None:
        aclient = AsyncClient(pool.client)
        try:
            with pytest.raises(AgentError, match="ValueError: nope"):
                await aclient.call("aio", "nope", op="fail")
            with pytest.raises(InvalidArguments):
                await aclient.call("aio", 1, op="add")
            busy = [pool.client.cast("aio", sleep=1.5) for _ in range(4)]
            await asyncio.sleep(0.3)
            with pytest.raises(CheckoutTimeout):
                await aclient.call("aio", timeout=0.3)
            for handle in busy:
                handle.result(timeout=10)
        finally:
            await aclient.aclose()

    asyncio.run(main())


def test_async_lease_keeps_one_agent(pool: RunningPool) -> None:
    async def main() -> list[dict[str, Any]]:
        aclient = AsyncClient(pool.client)
        try:
            async with aclient.lease("aio", timeout=5, ttl=10) as agent:
                answers = [await agent.call(marker=str(i)) for i in range(3)]
                assert (await aclient.status("aio")).in_use == 1
                return answers
        finally:
            await aclient.aclose()

    answers = asyncio.run(main())
    assert len({a["agent"] for a in answers}) == 1
    first = answers[0]["calls"]
    assert [a["calls"] for a in answers] == [first, first + 1, first + 2]


def test_map_keeps_input_order_and_reports_errors_per_item(pool: RunningPool) -> None:
    progress: list[tuple[int, int]] = []
    items = [{"a": i, "b": i} for i in range(30)] + [{"a": 1}]  # the last one lacks b
    results = pool.client.map(
        "aio", items, op="add", kwargs=True, return_exceptions=True, on_progress=lambda d, t: progress.append((d, t))
    )
    assert results[:30] == [2 * i for i in range(30)]
    assert isinstance(results[30], InvalidArguments)
    assert progress[-1] == (31, 31) and len(progress) == 31
    with pytest.raises(InvalidArguments):
        pool.client.map("aio", items, op="add", kwargs=True)


def test_wait_quiet_waits_for_quiescence(pool: RunningPool) -> None:
    handles = [pool.client.cast("aio", sleep=0.3) for _ in range(8)]
    status = pool.client.wait_quiet("aio", timeout=30)
    assert (status.waiting, status.in_use) == (0, 0)
    assert all(handle.ready() for handle in handles)


def test_map_command_prints_results_in_order_with_a_progress_bar(pool: RunningPool) -> None:
    lines = [json.dumps([i, 10]) for i in range(20)] + ['{"a": 1}']
    env = {**os.environ, "POOLQ_CONFIG": str(pool.config.path), "POOLQ_BROKER_URL": pool.config.broker_url}
    done = subprocess.run(
        [sys.executable, "-m", "poolq", "map", "aio", "-", "--op", "add"],
        input="\n".join(lines), env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert results[:20] == [i + 10 for i in range(20)]
    assert results[20]["error"].startswith("InvalidArguments")
    assert "poolq map aio" in done.stderr  # the progress bar
