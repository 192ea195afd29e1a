"""Prometheus metrics of every pool: ``poolq metrics`` serves them, or mount them in your app.

Each scrape reads the registry, the queues and the call histograms
(:mod:`poolq.store.metrics`) of every configured pool: a few round trips per
pool, nothing kept in the exporter, so any number of exporters may run and a
restarted one loses nothing. Serve them::

    poolq metrics --port 9808            # http://127.0.0.1:9808/metrics

or mount them in a web app of your own::

    from poolq.metrics import asgi_app, wsgi_app
    app.mount("/metrics", asgi_app())    # Starlette / FastAPI
    # Flask: DispatcherMiddleware(app.wsgi_app, {"/metrics": wsgi_app()})

Every metric has a ``pool`` label; :data:`METRICS` lists them all. Queue depth
(``poolq_pool_waiting``) and the agents at work (``poolq_pool_in_use``) are
what an external autoscaler (KEDA, a Kubernetes HPA) reads: see
``docs/deploy.md``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, make_asgi_app, make_wsgi_app, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .client.sync import Client
from .store import metrics as recorded
from .store.status import PoolStatus

logger = logging.getLogger("poolq.metrics")

#: The port ``poolq metrics`` listens on by default.
DEFAULT_PORT = 9808

#: The pool states (``poolq_pool_state`` has one series per state, 1 for the current one).
POOL_STATES = ("ready", "overflow", "full", "degraded", "closed", "skipped")
#: The agent states (``poolq_agents`` counts the pool's agents in each).
AGENT_STATES = ("starting", "idle", "busy", "leased", "recycling", "unhealthy", "failed", "degraded", "lost")

#: Every metric, its type, labels and meaning (the README and the tests read this table).
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "poolq_up": ("gauge", (), "1 when the exporter could read the state store on this scrape, else 0"),
    "poolq_pool_size": ("gauge", ("pool",), "Base agents serving (not starting, not lost)"),
    "poolq_pool_min_size": ("gauge", ("pool",), "Configured lower bound of the base size per node"),
    "poolq_pool_max_size": ("gauge", ("pool",), "Configured upper bound of the base size per node"),
    "poolq_pool_available": ("gauge", ("pool",), "Idle agents, ready for a call"),
    "poolq_pool_in_use": ("gauge", ("pool",), "Agents running a call or held by a lease"),
    "poolq_pool_overflow": ("gauge", ("pool",), "Agents above the nodes' base size"),
    "poolq_pool_max_overflow": ("gauge", ("pool",), "Overflow agents the nodes may start"),
    "poolq_pool_waiting": ("gauge", ("pool",), "Calls in the pool's queue, not yet taken by a node"),
    "poolq_pool_starting": ("gauge", ("pool",), "Agents setting up or recycling"),
    "poolq_pool_nodes": ("gauge", ("pool",), "Worker nodes serving the pool"),
    "poolq_pool_state": ("gauge", ("pool", "state"), "1 for the pool's current state, 0 for the others"),
    "poolq_pool_breaker_open": ("gauge", ("pool",), "1 while the circuit breaker is open (setups keep failing)"),
    "poolq_agents": ("gauge", ("pool", "state"), "Agents of the pool in each state"),
    "poolq_requests_total": ("counter", ("pool",), "Calls the pool's agents ran"),
    "poolq_recycles_total": ("counter", ("pool",), "Agents replaced by fresh ones"),
    "poolq_agents_spawned_total": ("counter", ("pool",), "Agent setups that succeeded"),
    "poolq_agents_terminated_total": ("counter", ("pool",), "Agents torn down"),
    "poolq_scale_events_total": ("counter", ("pool", "direction"), "Scale events, up and down"),
    "poolq_calls_total": ("counter", ("pool", "op", "outcome"), "Calls that ended, by outcome (ok or error kind)"),
    "poolq_call_queued_seconds": ("histogram", ("pool", "op"), "Seconds a call waited for an agent"),
    "poolq_call_run_seconds": ("histogram", ("pool", "op"), "Seconds a call's operation ran"),
}

_COUNTERS = {
    "poolq_requests_total": "requests",
    "poolq_recycles_total": "recycles",
    "poolq_agents_spawned_total": "spawned",
    "poolq_agents_terminated_total": "terminated",
}
_GAUGES: dict[str, Callable[[PoolStatus], int]] = {
    "poolq_pool_size": lambda s: s.size,
    "poolq_pool_available": lambda s: s.available,
    "poolq_pool_in_use": lambda s: s.in_use,
    "poolq_pool_overflow": lambda s: s.overflow,
    "poolq_pool_max_overflow": lambda s: s.max_overflow,
    "poolq_pool_waiting": lambda s: s.waiting,
    "poolq_pool_starting": lambda s: s.starting,
    "poolq_pool_nodes": lambda s: len(s.nodes),
    "poolq_pool_breaker_open": lambda s: int(bool(s.degraded_by)),
}


class PoolCollector(Collector):
    """Collects every pool's metrics at scrape time (a prometheus_client custom collector)."""

    def __init__(self, client: Client | None = None) -> None:
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self) -> Client:
        with self._lock:
            if self._client is None:
                self._client = Client()
            return self._client

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the configured pools: collected at scrape time only

    def collect(self) -> Iterator[Metric]:
        families = {name: _family(name) for name in METRICS}
        up = 1
        client = self.client
        for pool in client.config.pools.values():
            try:
                status = client.status(pool.name)
                histograms = recorded.read(client.state, pool.name)
            except Exception as exc:  # a scrape reports what it cannot read, and never raises
                logger.warning("metrics of pool %s unavailable: %s", pool.name, exc)
                up = 0
                continue
            _add_pool(families, pool.name, pool.min_size, pool.max_size, status, histograms)
        families["poolq_up"].add_metric([], up)
        yield from families.values()


def registry(client: Client | None = None) -> CollectorRegistry:
    """A Prometheus registry holding poolq's collector only."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(PoolCollector(client))
    return reg


def wsgi_app(client: Client | None = None) -> Any:
    """A WSGI app that serves the metrics (mount it at ``/metrics``)."""
    return make_wsgi_app(registry(client))


def asgi_app(client: Client | None = None) -> Any:
    """An ASGI app that serves the metrics (mount it at ``/metrics``)."""
    return make_asgi_app(registry(client))


def serve(port: int = DEFAULT_PORT, address: str = "127.0.0.1", client: Client | None = None) -> Any:
    """Serve ``/metrics`` on ``address:port`` in a daemon thread; the server (``.shutdown()`` stops it)."""
    server, _thread = start_http_server(port, addr=address, registry=registry(client))
    return server


def _family(name: str) -> Any:
    kind, labels, documentation = METRICS[name]
    if kind == "counter":
        return CounterMetricFamily(name, documentation, labels=labels)
    if kind == "histogram":
        return HistogramMetricFamily(name, documentation, labels=labels)
    return GaugeMetricFamily(name, documentation, labels=labels)


def _add_pool(
    families: dict[str, Any],
    pool: str,
    min_size: int,
    max_size: int,
    status: PoolStatus,
    histograms: recorded.PoolMetrics,
) -> None:
    for name, value in _GAUGES.items():
        families[name].add_metric([pool], value(status))
    families["poolq_pool_min_size"].add_metric([pool], min_size)
    families["poolq_pool_max_size"].add_metric([pool], max_size)
    for state in POOL_STATES:
        families["poolq_pool_state"].add_metric([pool, state], int(status.state == state))
    by_state = dict.fromkeys(AGENT_STATES, 0)
    for agent in status.agents:
        by_state[agent.state] = by_state.get(agent.state, 0) + 1
    for state, count in by_state.items():
        families["poolq_agents"].add_metric([pool, state], count)
    for name, counter in _COUNTERS.items():
        families[name].add_metric([pool], status.counters.get(counter, 0))
    families["poolq_scale_events_total"].add_metric([pool, "up"], status.counters.get("scale_ups", 0))
    families["poolq_scale_events_total"].add_metric([pool, "down"], status.counters.get("scale_downs", 0))
    for (op, outcome), count in sorted(histograms.calls.items()):
        families["poolq_calls_total"].add_metric([pool, op, outcome], count)
    for (series, op), histogram in sorted(histograms.histograms.items()):
        family = families.get(f"poolq_call_{series}_seconds")
        if family is not None:
            family.add_metric([pool, op], histogram.cumulative(), histogram.total)
