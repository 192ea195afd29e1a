"""``python -m bench.web``: the web examples under 200 concurrent requests.

Starts its own embedded broker, an ``echo`` pool of two agents, and each
example app (FastAPI on uvicorn, Flask on its threaded server), sends bursts
of concurrent ``POST /echo`` requests, and prints p50/p99 latency
per app. Writes ``bench/web.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.__main__ import ROOT, ms, percentile
from examples import APPS, server_argv
from poolq.local.embedded import EmbeddedRedis
from poolq.testing import PoolFactory, app_server, free_port


async def post(port: int, path: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 POST on a new connection; status and JSON body.

    A few lines of asyncio instead of an HTTP client library: at 200
    requests in flight, httpx's connection pool costs the load generator
    several times the CPU the server spends, and on two cores the bench would
    measure the client.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    writer.write(head.encode() + body)
    response = await reader.read()
    writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2] or b"null")


async def burst(port: int, concurrency: int) -> list[float]:
    """``concurrency`` requests at once; each one's latency in seconds (all must succeed)."""

    async def one(i: int) -> float:
        started = time.perf_counter()
        status, body = await post(port, "/echo", {"text": f"m{i}"})
        assert status == 200 and body["text"] == f"m{i}", (status, body)
        return time.perf_counter() - started

    return list(await asyncio.gather(*(one(i) for i in range(concurrency))))


def measure(port: int, concurrency: int, bursts: int) -> dict[str, Any]:
    asyncio.run(burst(port, 20))  # warm the server's and poolq's connections
    latencies: list[float] = []
    started = time.perf_counter()
    for _ in range(bursts):
        latencies += asyncio.run(burst(port, concurrency))
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "per_s": round(len(latencies) / wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.web", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "web.json")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="poolq-bench-web-") as tmp:
        broker = EmbeddedRedis(Path(tmp) / "broker", persist=False)
        pools = PoolFactory(broker.start(), Path(tmp), pythonpath=[str(ROOT)])
        try:
            pool = pools.start("echo", "workers.echo:Echo", size=2, max_overflow=0)
            for name in APPS:
                port = free_port()
                with app_server(server_argv(name, port), port, pools.environment(pool), Path(tmp) / f"{name}.log"):
                    print(f"running {name} ...", file=sys.stderr, flush=True)
                    results[name] = measure(port, args.concurrency, args.bursts)
        finally:
            pools.stop_all()
            broker.stop()
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name, figures in results.items():
        print(f"  {name:<8} " + "  ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
