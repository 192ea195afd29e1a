"""The numbers behind ``/metrics`` that the registry does not hold: how long calls wait and run.

Every worker process adds its calls up in memory, by pool, operation and
outcome (:class:`Recorder`, an observer of :mod:`poolq.events`), and adds
them to its pool's hash in the state Redis at every heartbeat (one round trip
every 2 s, none on the call path; calls that ran in the last 2 s before a
process was killed are not counted). The exporter (:mod:`poolq.metrics`) reads
the hash whole: histograms of the seconds a call waited for an agent and ran,
and counts of calls by outcome, exact to the last heartbeat.

Fields of ``poolq:pool:<pool>:metrics``: ``<series>|<op>|<bucket index>`` (a
histogram's bucket), ``<series>|<op>|sum``, ``calls|<op>|<outcome>``.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import redis

from ..events import CallFailed, CallStarted, CallSucceeded, Observer, subscribe
from . import keys

#: Upper bounds (seconds) of the histograms' buckets, as Prometheus counts them.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: The longest operation name kept as a label.
MAX_OP_LABEL = 64
#: The histograms: seconds a call waited for an agent, seconds its operation ran.
SERIES = ("queued", "run")


def bucket(seconds: float) -> int:
    """The index of the first bucket that holds ``seconds`` (``len(BUCKETS)`` for +Inf)."""
    return bisect.bisect_left(BUCKETS, seconds)


@dataclass
class Histogram:
    """One series of one operation, read back: cumulative counts per bucket, sum and count."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def cumulative(self) -> list[tuple[str, int]]:
        running, out = 0, []
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], self.buckets, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass
class PoolMetrics:
    """What the hash of one pool says."""

    histograms: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    calls: dict[tuple[str, str], int] = field(default_factory=dict)


class Recorder(Observer):
    """Adds this process's calls up and writes them to the state Redis when :meth:`flush` is called."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._sums: defaultdict[tuple[str, str], float] = defaultdict(float)

    def call_started(self, event: CallStarted) -> None:
        self._observe(event.pool, "queued", event.op, event.queued_s)

    def call_succeeded(self, event: CallSucceeded) -> None:
        self._observe(event.pool, "run", event.op, event.duration_s, outcome="ok")

    def call_failed(self, event: CallFailed) -> None:
        # A name the agent does not have is the caller's, not an operation: one label for all of them.
        op = "(unknown)" if event.kind == "unknown_operation" else event.op
        if event.ran:
            self._observe(event.pool, "run", op, event.duration_s, outcome=event.kind)
        else:
            with self._lock:
                self._counts[(event.pool, f"calls|{_label(op)}|{event.kind}")] += 1

    def flush(self, client: redis.Redis) -> None:
        """Add what was counted since the last flush to the pools' hashes.

        Raises:
            redis.RedisError: the Redis is away; the counts are kept for the next flush.
        """
        with self._lock:
            counts, sums = self._counts, self._sums
            self._counts, self._sums = Counter(), defaultdict(float)
        if not counts:
            return
        pipe = client.pipeline(transaction=False)
        for (pool, name), amount in counts.items():
            pipe.hincrby(keys.metrics(pool), name, amount)
        for (pool, name), seconds in sums.items():
            pipe.hincrbyfloat(keys.metrics(pool), name, seconds)
        try:
            pipe.execute()
        except redis.ConnectionError:
            # Nothing was written (the pipeline never reached the server): count it next time.
            with self._lock:
                self._counts.update(counts)
                for series, seconds in sums.items():
                    self._sums[series] += seconds
            raise

    def reset(self) -> None:
        """Forget what was counted (in a new child process: its parent reports its own counts)."""
        with self._lock:
            self._counts, self._sums = Counter(), defaultdict(float)

    def _observe(self, pool: str, series: str, op: str, seconds: float, outcome: str = "") -> None:
        seconds, op = max(0.0, seconds), _label(op)
        with self._lock:
            self._counts[(pool, f"{series}|{op}|{bucket(seconds)}")] += 1
            self._sums[(pool, f"{series}|{op}|sum")] += seconds
            if outcome:
                self._counts[(pool, f"calls|{op}|{outcome}")] += 1


def _label(op: str) -> str:
    """``op`` as a label: a message that did not come through a client may name anything."""
    return op if (op.isidentifier() and len(op) <= MAX_OP_LABEL) or op == "(unknown)" else "(invalid)"


def read(client: redis.Redis, pool: str) -> PoolMetrics:
    """The histograms and call counts of ``pool``, from its hash."""
    metrics = PoolMetrics()
    for name, value in client.hgetall(keys.metrics(pool)).items():
        series, _, rest = str(name).partition("|")
        op, _, last = rest.rpartition("|")
        if series == "calls":
            metrics.calls[(op, last)] = int(value)
            continue
        histogram = metrics.histograms.setdefault((series, op), Histogram())
        if last == "sum":
            histogram.total = float(value)
        elif last.isdigit() and int(last) < len(histogram.buckets):
            histogram.buckets[int(last)] += int(value)
    return metrics


#: This process's recorder: it hears every event of the process, and the
#: registry's heartbeat flushes it (:class:`poolq.store.registry.Heartbeat`).
recorder = Recorder()
subscribe(recorder)
os.register_at_fork(after_in_child=recorder.reset)
