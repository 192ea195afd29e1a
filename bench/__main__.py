"""``python -m bench``: poolq against bare Celery and against cold starts, in one run.

It starts its own embedded broker, poolq workers (through ``poolq.testing``)
and a bare Celery worker with the same delivery settings, runs each scenario,
prints a table and writes ``bench/results.json``. ``--quick`` runs tiny sizes
(the smoke test in the suite uses it so the bench never rots).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celery
import redis

from poolq import AsyncClient
from poolq.local.embedded import EmbeddedRedis
from poolq.local.procs import child_preexec, stop_process
from poolq.testing import PoolFactory, RunningPool

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"


@dataclass(frozen=True)
class Sizes:
    call_batches: int
    call_batch: int
    casts: int
    cast_rounds: int
    warm_calls: int
    cold_calls: int
    acalls: int
    burst: int
    recycle_calls: int


FULL = Sizes(call_batches=10, call_batch=100, casts=1000, cast_rounds=5, warm_calls=200, cold_calls=3, acalls=1000,
             burst=200, recycle_calls=1500)  # fmt: skip
QUICK = Sizes(call_batches=2, call_batch=10, casts=50, cast_rounds=2, warm_calls=10, cold_calls=1, acalls=50,
              burst=16, recycle_calls=40)  # fmt: skip


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class Stack:
    """The broker, the poolq pools and the bare Celery worker of one bench run."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.broker = EmbeddedRedis(directory / "broker", persist=False)
        self.url = ""
        self.pools: PoolFactory | None = None

    def __enter__(self) -> Stack:
        self.url = self.broker.start()
        self.pools = PoolFactory(self.url, self.directory, pythonpath=[str(ROOT)])
        os.environ["BENCH_BROKER_URL"] = self.url
        # The bare worker's log level: a log line per task is a cost, not poolq's.
        os.environ["POOLQ_LOGLEVEL"] = "WARNING"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pools is not None:
            self.pools.stop_all()
        self.broker.stop()

    def pool(self, name: str, agent: str, **keys: Any) -> RunningPool:
        assert self.pools is not None
        return self.pools.start(name, agent, **keys)

    @contextmanager
    def bare_worker(self, concurrency: int) -> Iterator[Any]:
        """A bare Celery worker with poolq's worker flags; yields the bare app."""
        from bench import bare

        log = (self.directory / f"bare-{concurrency}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.bare", "worker", "-Q", bare.QUEUE, "-c", str(concurrency),
             "-P", "prefork", "-n", f"bare{concurrency}@bench", "-E", "--without-mingle", "--without-gossip",
             "-l", "WARNING"],
            env={**os.environ, "PYTHONPATH": str(ROOT), "BENCH_BROKER_URL": self.url},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=child_preexec,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not bare.app.control.ping(destination=[f"bare{concurrency}@bench"], timeout=0.5):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the bare Celery worker did not start")
            bare.echo.delay(0).get(timeout=30)  # warm its processes and connections
            yield bare
        finally:
            stop_process(process, timeout=30)
            log.close()


def bench_call(stack: Stack, sizes: Sizes) -> dict[str, float]:
    """Sequential round trips, poolq.call vs apply_async().get(), alternating batches.

    Also poolq.call on a ``worker_pool = "solo"`` node: the agent runs in the
    node's main process, without prefork's hand-off to a child process.
    """
    pool = stack.pool("bench_call", "bench.agents:Echo", size=1)
    client = pool.client
    solo = stack.pool("bench_solo", "bench.agents:Echo", size=1, worker_pool="solo").client
    floor = redis.Redis.from_url(stack.url)
    pings = []
    for _ in range(sizes.call_batch * 5):
        started = time.perf_counter()
        floor.ping()
        pings.append(time.perf_counter() - started)
    poolq_times: list[float] = []
    solo_times: list[float] = []
    celery_times: list[float] = []
    with stack.bare_worker(1) as bare:
        for _ in range(20):  # warm every path
            client.call("bench_call", 1)
            solo.call("bench_solo", 1)
            bare.echo.apply_async((1,)).get(timeout=10)
        for _ in range(sizes.call_batches):
            for _ in range(sizes.call_batch):
                started = time.perf_counter()
                client.call("bench_call", 1)
                poolq_times.append(time.perf_counter() - started)
            for _ in range(sizes.call_batch):
                started = time.perf_counter()
                solo.call("bench_solo", 1)
                solo_times.append(time.perf_counter() - started)
            for _ in range(sizes.call_batch):
                started = time.perf_counter()
                bare.echo.apply_async((1,)).get(timeout=10)
                celery_times.append(time.perf_counter() - started)
        # Redis commands per round trip, counted by the server (idle workers'
        # polls and heartbeats included, as they are in any deployment).
        poolq_commands = commands_per(floor, lambda: client.call("bench_call", 1), sizes.call_batch)
        celery_commands = commands_per(floor, lambda: bare.echo.apply_async((1,)).get(timeout=10), sizes.call_batch)
    poolq_p50, celery_p50 = statistics.median(poolq_times), statistics.median(celery_times)
    return {
        "poolq_p50_ms": ms(poolq_p50),
        "poolq_p99_ms": ms(percentile(poolq_times, 99)),
        "celery_p50_ms": ms(celery_p50),
        "celery_p99_ms": ms(percentile(celery_times, 99)),
        "ratio_p50": round(poolq_p50 / celery_p50, 3),
        "redis_floor_ms": ms(statistics.median(pings)),
        "solo_p50_ms": ms(statistics.median(solo_times)),
        "solo_p99_ms": ms(percentile(solo_times, 99)),
        "ratio_solo_p50": round(statistics.median(solo_times) / celery_p50, 3),
        "calls": len(poolq_times),
        "poolq_redis_commands": poolq_commands,
        "celery_redis_commands": celery_commands,
    }


def commands_per(server: redis.Redis, round_trip: Callable[[], Any], times: int) -> float:
    """Commands the Redis server processed per ``round_trip()``, over ``times`` of them."""
    before = int(server.info("stats")["total_commands_processed"])
    for _ in range(times):
        round_trip()
    after = int(server.info("stats")["total_commands_processed"])
    return round((after - before - 1) / times, 1)


def bench_cast(stack: Stack, sizes: Sizes) -> dict[str, float]:
    """Bursts of casts vs bare delay(), each waited for to its result; alternating rounds, median rates.

    Throughput on a small machine swings by a fifth from one burst to the
    next (other processes, the broker's own work), so several A/B rounds are
    run and the ratio is taken of the medians.
    """
    pool = stack.pool("bench_cast", "bench.agents:Echo", size=2)
    client = pool.client
    poolq_rates, celery_rates = [], []
    with stack.bare_worker(2) as bare:
        for _ in range(sizes.cast_rounds):
            started = time.perf_counter()
            handles = [client.cast("bench_cast", i) for i in range(sizes.casts)]
            assert [h.result(timeout=120) for h in handles] == list(range(sizes.casts))
            poolq_rates.append(sizes.casts / (time.perf_counter() - started))
            started = time.perf_counter()
            results = [bare.echo.delay(i) for i in range(sizes.casts)]
            assert [r.get(timeout=120) for r in results] == list(range(sizes.casts))
            celery_rates.append(sizes.casts / (time.perf_counter() - started))
    poolq_rate, celery_rate = statistics.median(poolq_rates), statistics.median(celery_rates)
    return {
        "poolq_per_s": round(poolq_rate, 1),
        "celery_per_s": round(celery_rate, 1),
        "ratio": round(poolq_rate / celery_rate, 3),
        "casts": sizes.casts * sizes.cast_rounds,
    }


def bench_warm_vs_cold(stack: Stack, sizes: Sizes) -> dict[str, float]:
    """An agent with a 1 s setup: a warm poolq call vs building the agent per request."""
    pool = stack.pool("bench_heavy", "bench.agents:Heavy", size=1, options={"setup_seconds": 1.0})
    solo = stack.pool("bench_heavy_solo", "bench.agents:Heavy", size=1, worker_pool="solo",
                      options={"setup_seconds": 1.0})  # fmt: skip
    warm, warm_solo = [], []
    for _ in range(sizes.warm_calls):
        started = time.perf_counter()
        pool.client.call("bench_heavy", 1)
        warm.append(time.perf_counter() - started)
        started = time.perf_counter()
        solo.client.call("bench_heavy_solo", 1)
        warm_solo.append(time.perf_counter() - started)
    cold = []
    with stack.bare_worker(1) as bare:
        for _ in range(sizes.cold_calls):
            started = time.perf_counter()
            bare.cold.apply_async((1,), queue=bare.QUEUE).get(timeout=30)
            cold.append(time.perf_counter() - started)
    warm_p50, cold_p50, solo_p50 = statistics.median(warm), statistics.median(cold), statistics.median(warm_solo)
    return {
        "warm_p50_ms": ms(warm_p50),
        "cold_p50_ms": ms(cold_p50),
        "ratio": round(cold_p50 / warm_p50, 1),
        "solo_warm_p50_ms": ms(solo_p50),
        "ratio_solo": round(cold_p50 / solo_p50, 1),
    }


def bench_acall(stack: Stack, sizes: Sizes) -> dict[str, float]:
    """Concurrent acalls from one event loop (on the cast pool, two agents)."""
    client = stack.pool("bench_acall", "bench.agents:Echo", size=2).client

    async def run() -> float:
        aclient = AsyncClient(client)
        try:
            await asyncio.gather(*(aclient.call("bench_acall", i) for i in range(20)))  # warm
            started = time.perf_counter()
            results = await asyncio.gather(*(aclient.call("bench_acall", i, timeout=120) for i in range(sizes.acalls)))
            wall = time.perf_counter() - started
            assert results == list(range(sizes.acalls))
            return wall
        finally:
            await aclient.aclose()

    wall = asyncio.run(run())
    return {"n": sizes.acalls, "wall_s": round(wall, 3), "per_s": round(sizes.acalls / wall, 1)}


def bench_scale_up(stack: Stack, sizes: Sizes) -> dict[str, float]:
    """A burst of 100 ms calls on a pool of min 1, max 4: time to max size and makespan vs ideal."""
    assert stack.pools is not None
    interval = 1.0
    pool = stack.pool(
        "bench_scale", "bench.agents:Echo", size=1, min_size=1, max_size=4, maintenance_interval=interval,
        idle_timeout=120,
    )  # fmt: skip
    stack.pools.start_maintenance(pool)
    time.sleep(2 * interval)  # beat and the maintainer up
    started = time.perf_counter()
    handles = [pool.client.cast("bench_scale", 0.1, f"m{i}", op="sleep") for i in range(sizes.burst)]
    at_max = None
    done = 0  # calls finish in queue order, give or take the last few in flight
    while done < len(handles):
        while done < len(handles) and handles[done].ready():
            done += 1
        if at_max is None and sum(1 for a in pool.client.status("bench_scale").agents if a.state != "starting") >= 4:
            at_max = time.perf_counter() - started
        time.sleep(0.02)
    makespan = time.perf_counter() - started
    assert {h.result() for h in handles} == {f"m{i}" for i in range(sizes.burst)}
    # What the burst costs bare Celery with four processes from the start:
    # the same per-task dispatch, without any scaling.
    with stack.bare_worker(4) as bare:
        started = time.perf_counter()
        results = [bare.sleep.delay(0.1, f"m{i}") for i in range(sizes.burst)]
        assert {r.get(timeout=120) for r in results} == {f"m{i}" for i in range(sizes.burst)}
        bare_makespan = time.perf_counter() - started
    ideal = sizes.burst * 0.1 / 4
    return {
        "tasks": sizes.burst,
        "interval_s": interval,
        "time_to_max_s": round(at_max if at_max is not None else makespan, 3),
        "makespan_s": round(makespan, 3),
        "ideal_s": round(ideal, 3),
        "makespan_ratio": round(makespan / ideal, 3),
        "celery_at_max_s": round(bare_makespan, 3),
        "ratio_vs_celery_at_max": round(makespan / bare_makespan, 3),
    }


def bench_recycling(stack: Stack, sizes: Sizes) -> dict[str, float]:
    """p99 while agents with a 1 s setup recycle (every ~20 calls) vs steady; lost and duplicated calls counted.

    The setup is what recycling costs, so it is a real one (1 s), and the
    fewest warm agents seen during the load is reported with it.
    """
    options = {"redis_url": stack.url, "setup_seconds": 1.0}
    steady_pool = stack.pool("bench_steady", "tests.agents:Probe", size=3, options=options)
    churn_pool = stack.pool(
        "bench_churn", "tests.agents:Probe", size=3, max_requests=20, recycle_jitter=0.3, options=options
    )
    steady = _load(steady_pool, "bench_steady", sizes.recycle_calls)
    warm: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            agents = churn_pool.client.status("bench_churn").agents
            warm.append(sum(1 for a in agents if a.state in ("idle", "busy", "leased")))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    churn = _load(churn_pool, "bench_churn", sizes.recycle_calls)
    sampling.set()
    sampler.join()
    state = redis.Redis.from_url(stack.url, decode_responses=True)
    ran = state.lrange("test:bench_churn:ran", 0, -1)
    expected = {f"m{i}" for i in range(sizes.recycle_calls)}
    return {
        "setup_s": 1.0,
        "steady_p99_ms": ms(percentile(steady, 99)),
        "recycling_p99_ms": ms(percentile(churn, 99)),
        "ratio_p99": round(percentile(churn, 99) / percentile(steady, 99), 3),
        "recycles": churn_pool.client.status("bench_churn").counters["recycles"],
        "fewest_warm": min(warm),
        "size": 3,
        "lost": len(expected - set(state.lrange("test:bench_churn:done", 0, -1))),
        "duplicated": len(ran) - len(set(ran)),
    }


def _load(pool: RunningPool, name: str, count: int) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def run(part: int) -> None:
        for i in range(part, count, 2):
            started = time.perf_counter()
            pool.client.call(name, f"m{i}", 0.005, op="work", timeout=30)
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=run, args=(part,)) for part in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def machine(stack: Stack) -> dict[str, Any]:
    info = redis.Redis.from_url(stack.url).info("server")
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "redis_server": f"{info.get('server_name', 'redis')} {info.get('valkey_version') or info.get('redis_version')}",
        "platform": platform.platform(),
    }


SCENARIOS: list[tuple[str, Callable[[Stack, Sizes], dict[str, Any]]]] = [
    ("call", bench_call),
    ("cast", bench_cast),
    ("warm_vs_cold", bench_warm_vs_cold),
    ("acall", bench_acall),
    ("scale_up", bench_scale_up),
    ("recycling", bench_recycling),
]


def render(results: dict[str, Any]) -> str:
    lines = [f"poolq bench on {results['machine']['cores']} cores, Python {results['machine']['python']}, "
             f"Celery {results['machine']['celery']}, {results['machine']['redis_server']}"]  # fmt: skip
    for name, _ in SCENARIOS:
        if name in results:
            figures = "  ".join(f"{k}={v}" for k, v in results[name].items())
            lines.append(f"  {name:<13} {figures}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    parser.add_argument("--only", nargs="*", choices=[n for n, _ in SCENARIOS], help="run only these scenarios")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="poolq-bench-") as tmp, Stack(Path(tmp)) as stack:
        results: dict[str, Any] = {"machine": machine(stack)}
        for name, scenario in SCENARIOS:
            if args.only and name not in args.only:
                continue
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = scenario(stack, sizes)
    results["machine"]["bench_seconds"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
