"""An agent with a ``@poolq.batched`` operation for the batching tests; it records each invocation in Redis.

``options.redis_url`` says where; the records live under ``test:<pool>:``:
``sizes`` (the batch size of each invocation), ``ran`` (the markers of the
items an invocation started with) and ``done`` (of those it finished).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import redis

import poolq


class Gatherer(poolq.Agent):
    """Squares numbers in batches of at most 8, waiting up to 50 ms for companions.

    An item is ``{"n": int}`` plus, optionally, ``"marker"`` (recorded),
    ``"fail"`` (that item's result is a ValueError), ``"hold"`` (the first
    invocation that sees it sleeps that long, once per pool) and ``"crash"``
    (the process kills itself).
    """

    def setup(self) -> None:
        self.redis = redis.Redis.from_url(self.options["redis_url"], decode_responses=True)
        self.key = f"test:{self.pool}"

    def handle(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "op": "handle"}

    @poolq.batched(max_size=8, max_wait=0.05)
    def square(self, items: list[dict[str, Any]]) -> list[Any]:
        self.redis.rpush(f"{self.key}:sizes", len(items))
        markers = [str(item["marker"]) for item in items if item.get("marker")]
        if markers:
            self.redis.rpush(f"{self.key}:ran", *markers)
        hold = max(float(item.get("hold", 0)) for item in items)
        if hold and self.redis.set(f"{self.key}:held", 1, nx=True):
            time.sleep(hold)
        if any(item.get("crash") for item in items):
            os.kill(os.getpid(), signal.SIGKILL)
        results: list[Any] = []
        for item in items:
            if item.get("fail"):
                results.append(ValueError(f"item {item['n']} failed on purpose"))
            else:
                results.append({"n": item["n"], "square": item["n"] ** 2, "pid": os.getpid(), "batch": len(items)})
        if markers:
            self.redis.rpush(f"{self.key}:done", *markers)
        return results

    @poolq.batched(max_size=4, max_wait=0)
    def wrong_length(self, items: list[int]) -> list[int]:
        return [*items, 0]


def clear(redis_client: redis.Redis, pool: str) -> None:
    redis_client.delete(*(f"test:{pool}:{key}" for key in ("sizes", "ran", "done", "held")))


def sizes(redis_client: redis.Redis, pool: str) -> list[int]:
    """The batch size of every invocation of ``square`` so far."""
    return [int(size) for size in redis_client.lrange(f"test:{pool}:sizes", 0, -1)]
