"""The broker (which is also the state Redis here) goes away mid-burst and comes back (defects 3 and 10).

While it is away, calls cannot be sent (``BrokerUnavailable`` within about a
second), and those in flight wait for it, up to their own deadline. When it is
back, every agent serves again within a bound, a call that finished during the
outage delivers its result, and no call runs twice. With persistence
(append-only file) nothing accepted is lost; without it, the broker forgets
its queues, and their callers get a typed error, never a hang.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from poolq import BrokerUnavailable, CallTimeout, CheckoutTimeout, Client, PoolqError, load_config
from poolq.local.embedded import EmbeddedRedis
from poolq.testing import PoolFactory, RunningPool, render_config
from tests.reliability.agents import Ledger
from tests.reliability.conftest import AGENT

#: Seconds within which every agent serves again once the broker is back.
SERVE_AGAIN_BOUND = 15.0
#: The errors a caller may see because of an outage: all typed, none a hang.
OUTAGE_ERRORS = (BrokerUnavailable, CallTimeout, CheckoutTimeout)


class Load:
    """Callers that keep calling until stopped; every outcome kept by marker."""

    def __init__(self, pool: RunningPool, callers: int, seconds: float) -> None:
        self.pool = pool
        self.seconds = seconds
        self.outcomes: dict[str, Any] = {}
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(callers)]

    def run(self, caller: int) -> None:
        for n in range(10_000):
            if self.stopping.is_set():
                return
            marker = f"c{caller}-{n}"
            started = time.monotonic()
            try:
                result = self.pool.client.call(
                    self.pool.name, marker, self.seconds, op="work", timeout=3, call_timeout=5
                )
            except PoolqError as exc:
                result = exc
                time.sleep(0.2)
            self.outcomes[marker] = (result, time.monotonic() - started)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self.threads), "a caller hangs"


def _agents_all_serve(pool: RunningPool, agents: int) -> set[str]:
    """Names of the agents that served ``agents`` concurrent 1 s calls."""
    served: list[str] = []

    def probe(i: int) -> None:
        with contextlib.suppress(PoolqError):  # the broker may still be settling: the caller tries again
            served.append(pool.client.call(pool.name, f"probe{time.monotonic()}-{i}", 1.0, op="work")["agent"])

    threads = [threading.Thread(target=probe, args=(i,)) for i in range(agents)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return set(served)


@pytest.mark.parametrize(("outage", "persist"), [(3.0, True), (10.0, True), (3.0, False)])
def test_broker_outage_mid_burst(
    pools: PoolFactory, broker: EmbeddedRedis, ledger: Ledger, outage: float, persist: bool
) -> None:
    broker.persist = persist
    broker.restart()  # with the persistence this case needs
    pool = pools.start("outage", AGENT, size=2, options={"ledger": str(ledger.path)})
    casts = [pool.client.cast("outage", f"cast{i}", 0.3, op="work", call_timeout=5) for i in range(6)]

    with Load(pool, callers=3, seconds=0.4) as load:
        time.sleep(1.5)
        # When the broker goes away mid-burst, and comes back on the same address
        broker.stop()
        time.sleep(outage)
        broker.start()
        back = time.monotonic()
        # Then every agent serves again within the bound
        deadline = back + SERVE_AGAIN_BOUND
        while len(_agents_all_serve(pool, 2)) < 2:
            assert time.monotonic() < deadline, f"an agent did not serve again within {SERVE_AGAIN_BOUND}s"
        serving_again = time.monotonic() - back
        time.sleep(2.0)

    outcomes = load.outcomes
    errors = Counter(type(r).__name__ for r, _ in outcomes.values() if isinstance(r, Exception))
    ok = [m for m, (r, _) in outcomes.items() if isinstance(r, dict)]
    print(
        f"outage {outage:g}s persist={persist}: {len(outcomes)} calls, {len(ok)} answered, errors {dict(errors)}, "
        f"every agent serving {serving_again:.1f}s after the broker was back, "
        f"longest wait {max(w for _, w in outcomes.values()):.1f}s"
    )
    # Only typed errors, within each call's bound (timeout + call_timeout + grace, and the outage)
    assert all(isinstance(r, (dict, *OUTAGE_ERRORS)) for r, _ in outcomes.values())
    assert max(w for _, w in outcomes.values()) < 3 + 5 + 2 + outage + 5
    # No call ran twice, and every answered call ran to its end
    done = ledger.count("done")
    assert max(done.values()) == 1
    assert all(done[m] == 1 for m in ok)
    if persist:
        # Nothing accepted was lost: the casts sent before the outage complete
        assert [h.result(timeout=30)["marker"] for h in casts] == [f"cast{i}" for i in range(6)]
        assert all(done[f"cast{i}"] == 1 for i in range(6))


@pytest.mark.parametrize("entry", ["call", "cast"])
def test_sending_while_the_broker_is_away_fails_fast_and_typed(
    pools: PoolFactory, broker: EmbeddedRedis, ledger: Ledger, entry: str
) -> None:
    pool = pools.start("away", AGENT, size=1, options={"ledger": str(ledger.path)})
    broker.stop()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        getattr(pool.client, entry)("away", "m1")
    assert time.monotonic() - started < 3  # not Celery's retries of nearly 20 s


def test_sending_while_a_rabbitmq_broker_is_away_fails_fast_and_typed(poolq_broker: str, tmp_path: Path) -> None:
    # The state Redis answers, the broker does not (nothing listens on port 9)
    config_path = tmp_path / "pools.toml"
    config_path.write_text(render_config("away", {"agent": AGENT}))
    env = {"POOLQ_BROKER_URL": "amqp://guest:guest@127.0.0.1:9//", "POOLQ_STATE_URL": poolq_broker}
    client = Client(load_config(config_path, env=env))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        client.cast("away", "m1")
    assert time.monotonic() - started < 3
    client.close()
