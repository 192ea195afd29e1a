"""Ten minutes of load with processes killed along the way: flat memory, nothing lost (opt-in).

Run with ``python -m pytest --soak tests/reliability/test_soak.py`` (``POOLQ_SOAK_SECONDS``
sets the length, 600 by default).
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
from typing import Any

import psutil
import pytest

from poolq import PoolqError
from poolq.testing import PoolFactory
from tests.reliability.agents import Ledger
from tests.reliability.conftest import AGENT

SECONDS = float(os.environ.get("POOLQ_SOAK_SECONDS", "600"))


def _node_rss_mb(pid: int) -> float:
    """Resident memory of a node: its main process and its children."""
    main = psutil.Process(pid)
    processes = [main, *main.children(recursive=True)]
    return sum(p.memory_info().rss for p in processes if p.is_running()) / 2**20


@pytest.mark.soak
@pytest.mark.timeout(SECONDS + 180)  # the suite's 300 s per test is shorter than a soak
def test_soak(pools: PoolFactory, ledger: Ledger) -> None:
    pool = pools.start("soak", AGENT, size=3, max_deliveries=10, options={"ledger": str(ledger.path)})
    node = pool.workers[0].pid
    stop = threading.Event()
    outcomes: dict[str, Any] = {}
    rng = random.Random(11)

    def caller(part: int) -> None:
        n = 0
        while not stop.is_set():
            marker = f"p{part}-{n}"
            n += 1
            try:
                outcomes[marker] = pool.client.call(
                    "soak", marker, rng.uniform(0.02, 0.1), op="work", timeout=60, call_timeout=30
                )
            except PoolqError as exc:
                outcomes[marker] = exc

    threads = [threading.Thread(target=caller, args=(part,)) for part in range(4)]
    for thread in threads:
        thread.start()
    samples: list[float] = []
    kills = 0
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        time.sleep(5)
        samples.append(_node_rss_mb(node))
        busy = [a for a in pool.client.status("soak").agents if a.state == "busy"]
        if busy and len(samples) % 2 == 0:
            try:
                os.kill(rng.choice(busy).pid, signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
    stop.set()
    for thread in threads:
        thread.join(120)

    errors = [m for m, r in outcomes.items() if not isinstance(r, dict)]
    done = ledger.count("done")
    tenth = max(1, len(samples) // 10)
    early, late = statistics.median(samples[:tenth]), statistics.median(samples[-tenth:])
    print(
        f"soak {SECONDS:g}s: {len(outcomes)} calls, {kills} kills, errors {len(errors)}, "
        f"node memory {early:.0f} MB -> {late:.0f} MB"
    )
    assert not errors, errors[:5]
    assert all(done[m] == 1 for m in outcomes)  # none lost, none twice
    assert late < early * 1.25 + 20  # flat: no leak across thousands of calls and kills
