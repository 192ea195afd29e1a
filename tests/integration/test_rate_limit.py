"""F25: a pool-wide rate limit, kept in Redis: shared by every node and client, and across restarts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis

from poolq import CheckoutTimeout, PoolExhausted, RateLimited, UnknownOperation
from poolq.client.aio import AsyncClient, run_sync
from poolq.config import RateLimit
from poolq.store import connection, keys, ratelimit
from poolq.testing import PoolFactory, RunningPool
from tests.agents import clear

#: Seconds a client call may wait for an agent (and a slot) in these tests.
PATIENT = 60.0


def starts(state: redis.Redis, pool: str) -> list[tuple[str, float]]:
    """(marker, start time) of every ``stamp`` operation of ``pool`` that started, by start time."""
    rows = [line.rsplit(" ", 1) for line in state.lrange(f"test:{pool}:starts", 0, -1)]
    return sorted(((marker, float(at)) for marker, at in rows), key=lambda row: row[1])


def most_in_any_second(times: list[float]) -> int:
    """The most start times in any closed window of one second."""
    times, most, first = sorted(times), 0, 0
    for last, at in enumerate(times):
        while at - times[first] > 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def tightest(times: list[float], calls: int) -> float:
    """The shortest time spanned by ``calls + 1`` consecutive starts (over 1 s: the limit held)."""
    times = sorted(times)
    return min((times[i + calls] - times[i] for i in range(len(times) - calls)), default=float("inf"))


def in_threads(*jobs: Callable[[], Any]) -> list[Any]:
    """Run each job in a thread of its own, all at once; their results (a job's exception is raised here)."""
    results: list[Any] = [None] * len(jobs)
    go = threading.Barrier(len(jobs))

    def run(index: int, job: Callable[[], Any]) -> None:
        go.wait()
        try:
            results[index] = job()
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=3 * PATIENT)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


_CLIENT_PROCESS = """
import sys
from concurrent.futures import ThreadPoolExecutor
import poolq

pool, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = poolq.Client()
with ThreadPoolExecutor(4) as threads:
    results = list(threads.map(lambda i: client.call(pool, f"{prefix}{i}", op="stamp", timeout=60), range(count)))
print(len(results))
"""


def test_two_nodes_and_many_clients_never_exceed_the_limit(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    # Given a pool of two nodes (two agents each) limited to R operations a second
    r, n = 10, 60
    pool = poolq_pools.start(
        "paced", "tests.agents:Probe", nodes=2, size=2, rate_limit=f"{r}/s", options={"redis_url": poolq_broker}
    )
    clear(state, "paced")
    client = pool.client

    def calls(prefix: str, count: int) -> list[float]:
        return [client.call("paced", f"{prefix}{i}", op="stamp", timeout=PATIENT) for i in range(count)]

    def async_calls(prefix: str, count: int) -> list[float]:
        async def burst(aclient: AsyncClient) -> list[float]:
            return list(
                await asyncio.gather(
                    *(aclient.call("paced", f"{prefix}{i}", op="stamp", timeout=PATIENT) for i in range(count))
                )
            )

        return list(run_sync(burst, client))

    def leased(prefix: str, count: int) -> list[float]:
        with client.lease("paced", timeout=PATIENT) as agent:
            return [agent.call(f"{prefix}{i}", op="stamp") for i in range(count)]

    # When clients fire N calls at once: a thread, an event loop, a lease, and another process
    process = subprocess.Popen(
        [sys.executable, "-c", _CLIENT_PROCESS, "paced", "p", "20"],
        env=poolq_pools.environment(pool),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        began = time.monotonic()
        answers = in_threads(lambda: calls("t", 15), lambda: async_calls("a", 15), lambda: leased("l", 10))
        out, err = process.communicate(timeout=3 * PATIENT)
        took = time.monotonic() - began
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert out.strip() == "20"

    # Then every call ran exactly once and answered
    assert sum(len(a) for a in answers) == n - 20 and all(isinstance(t, float) for a in answers for t in a)
    started = starts(state, "paced")
    expected = {f"{p}{i}" for p, count in (("t", 15), ("a", 15), ("l", 10), ("p", 20)) for i in range(count)}
    assert Counter(marker for marker, _ in started) == dict.fromkeys(expected, 1)
    # ... never more than R of them started in any second, across both nodes and every client
    times = [at for _, at in started]
    most, span = most_in_any_second(times), times[-1] - times[0]
    print(
        f"\n{n} calls, rate_limit {r}/s, two nodes: at most {most} started in any 1 s window; "
        f"{r + 1} consecutive starts spanned at least {tightest(times, r):.3f}s; "
        f"starts spread over {span:.2f}s, the run took {took:.2f}s"
    )
    assert most <= r
    # ... and the limiter really limited: N calls need at least N/R - 1 seconds
    assert span >= n / r - 1
    status = client.status("paced")
    assert status.rate_limit == f"{r}/s" and status.counters["rate_delayed"] > 0


def test_block_false_is_refused_at_once_and_a_wait_past_the_timeout_never_runs(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    # Given a pool whose window is full for the next minute
    options = {"redis_url": poolq_broker}
    pool = poolq_pools.start("full", "tests.agents:Probe", size=2, rate_limit="3/m", options=options)
    clear(state, "full")
    client = pool.client
    for i in range(3):
        client.call("full", f"ok{i}", op="stamp")

    # When a call may not wait: RateLimited (a PoolExhausted) at once, from either client, and nothing taken
    latencies = []
    for i in range(20):
        began = time.perf_counter()
        with pytest.raises(RateLimited, match=r"pool 'full' is at its rate_limit \(3/m\); a slot frees in"):
            client.call("full", f"never{i}", op="stamp", block=False)
        latencies.append(time.perf_counter() - began)
    with pytest.raises(PoolExhausted):
        client.cast("full", "never-cast", op="stamp", block=False)

    async def refused(aclient: AsyncClient) -> None:
        with pytest.raises(RateLimited):
            await aclient.call("full", "never-async", op="stamp", block=False)

    run_sync(refused, client)
    print(f"\nRateLimited in {max(latencies) * 1000:.2f}ms at most")
    assert max(latencies) < 0.05
    assert client.status("full").waiting == 0  # nothing was sent
    assert state.zcard(keys.rate_window("full")) == 3  # looking took no slot

    # When calls may wait, but their timeout ends before a slot frees: CheckoutTimeout, and they never run
    handle = client.cast("full", "late-cast", op="stamp", timeout=1.0)
    began = time.monotonic()
    with pytest.raises(CheckoutTimeout, match="rate_limit"):
        client.call("full", "late", op="stamp", timeout=1.0)
    assert 1.0 <= time.monotonic() - began < 3.0
    with pytest.raises(CheckoutTimeout):
        handle.result(timeout=10)
    # ... and so does a lease's call, which waits up to the lease's timeout; the lease goes on
    with client.lease("full", timeout=1.0) as agent:
        with pytest.raises(CheckoutTimeout, match="rate_limit"):
            agent.call("late-lease", op="stamp")
        with pytest.raises(UnknownOperation):
            agent.call(op="no_such_operation")  # refused before its start: it takes no slot either
    time.sleep(0.5)
    assert [marker for marker, _ in starts(state, "full")] == ["ok0", "ok1", "ok2"]
    assert client.status("full").counters["rate_delayed"] == 3


def test_the_window_outlives_a_restart_of_the_node(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    # Given a node that used up its pool's window, and two calls waiting in it for a slot
    pool = poolq_pools.start(
        "durable_rate", "tests.agents:Probe", size=2, rate_limit="5/m", options={"redis_url": poolq_broker}
    )
    clear(state, "durable_rate")
    client = pool.client
    for i in range(5):
        client.call("durable_rate", f"ok{i}", op="stamp")
    waiting = [client.cast("durable_rate", f"waiting{i}", op="stamp", timeout=2.0) for i in range(2)]
    pool.wait_for(lambda: client.status("durable_rate").in_use == 2, timeout=10, what="two calls waiting")

    # When the node stops mid-run (its waiting calls end at their timeout) and starts again
    assert pool.workers.pop(0).stop() == 0
    for handle in waiting:
        with pytest.raises(CheckoutTimeout):
            handle.result(timeout=10)
    poolq_pools.add_node(pool)

    # Then the new node keeps to the same window: nothing more starts within the minute
    assert state.zcard(keys.rate_window("durable_rate")) == 5
    with pytest.raises(RateLimited):
        client.call("durable_rate", "refused", op="stamp", block=False)
    with pytest.raises(CheckoutTimeout, match="rate_limit"):
        client.call("durable_rate", "late", op="stamp", timeout=1.0)
    assert [marker for marker, _ in starts(state, "durable_rate")] == [f"ok{i}" for i in range(5)]


def test_the_limit_holds_while_a_node_restarts_mid_run(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    # Given two nodes of a pool limited to R a second, and a steady stream of calls
    r, n = 10, 40
    pool: RunningPool = poolq_pools.start(
        "restarted", "tests.agents:Probe", nodes=2, size=2, rate_limit=f"{r}/s", options={"redis_url": poolq_broker}
    )
    clear(state, "restarted")

    def calls(prefix: str) -> list[float]:
        return [pool.client.call("restarted", f"{prefix}{i}", op="stamp", timeout=PATIENT) for i in range(n // 2)]

    def restart() -> None:
        # When one node stops mid-run (warm: its calls finish) and a new one takes its place
        pool.wait_for(lambda: len(starts(state, "restarted")) >= 15, timeout=PATIENT, what="15 calls started")
        assert len(starts(state, "restarted")) < n  # mid-run: calls still to start
        stopped = pool.workers.pop(0)
        assert stopped.stop() == 0
        poolq_pools.add_node(pool, node=stopped.node)

    in_threads(lambda: calls("x"), lambda: calls("y"), restart)

    # Then every call ran once, and no second saw more than R start
    started = starts(state, "restarted")
    assert Counter(marker for marker, _ in started) == {f"{p}{i}": 1 for p in "xy" for i in range(n // 2)}
    most = most_in_any_second([at for _, at in started])
    print(f"\n{n} calls through a node restart, rate_limit {r}/s: at most {most} started in any 1 s window")
    assert most <= r


def test_the_window_counts_exactly_and_looking_takes_nothing(poolq_broker: str, state: redis.Redis) -> None:
    # Given an empty window of 3 a second
    scripts = connection.Scripts(connection.connect(poolq_broker))
    rate, pool = RateLimit(3, 1.0), "window_only"
    state.delete(keys.rate_window(pool), keys.stats(pool))
    try:
        # Then 3 are let through at once, and the 4th must wait for the oldest to leave the window
        assert [ratelimit.acquire(scripts, pool, rate, f"m{i}").granted for i in range(3)] == [True] * 3
        refused = ratelimit.acquire(scripts, pool, rate, "m3")
        assert not refused.granted and 0.9 < refused.wait <= ratelimit.window(rate)
        assert 0.9 < ratelimit.peek(scripts, pool, rate) <= ratelimit.window(rate)
        assert state.zcard(keys.rate_window(pool)) == 3
        # ... not past a deadline (on the server's clock), nor past a bound of the caller's
        assert ratelimit.acquire(scripts, pool, rate, "m3", deadline=time.time() - 1).late
        began = time.monotonic()
        assert not ratelimit.wait(scripts, pool, rate, "m3", until=began + 0.2)
        assert not ratelimit.wait(scripts, pool, rate, "m3", deadline=time.time() + 0.2)
        # ... and waiting sleeps just until a slot frees
        assert ratelimit.wait(scripts, pool, rate, "m3")
        assert 1.0 <= time.monotonic() - began < 1.0 + ratelimit.GUARD + 0.2
        assert ratelimit.peek(scripts, pool, rate) == 0.0
        assert state.hget(keys.stats(pool), ratelimit.DELAYED) == "5"  # each refused first try
    finally:
        state.delete(keys.rate_window(pool), keys.stats(pool))
        scripts.close()
