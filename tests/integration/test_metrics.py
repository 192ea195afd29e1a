"""F23: Prometheus metrics of a live pool, scraped from ``poolq metrics`` and from the mountable apps."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from poolq import AgentError, Client, UnknownOperation, load_config
from poolq.local.embedded import free_port
from poolq.metrics import METRICS, asgi_app, wsgi_app
from poolq.testing import PoolFactory, RunningPool, app_server

AGENT = "tests.agents:Probe"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return _samples(response.read().decode())


def _scrape_until(url: str, what: str, holds: object, timeout: float = 20.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        try:
            samples = _scrape(url)
        except OSError:
            samples = {}
        if samples and holds(samples):  # type: ignore[operator]
            return samples
        assert time.monotonic() < deadline, f"{what} not seen in {timeout:g}s: {sorted(samples.items())[:80]}"
        time.sleep(0.2)


@contextlib.contextmanager
def _exporter(poolq_pools: PoolFactory, pool: RunningPool, tmp_path: Path) -> Iterator[str]:
    """``poolq metrics`` for ``pool``, answering HTTP; its scrape URL. Stopped by pid on exit."""
    port = free_port()
    argv = [sys.executable, "-m", "poolq", "metrics", "--port", str(port)]
    with app_server(argv, port, poolq_pools.environment(pool), tmp_path / "metrics.log") as url:
        yield f"{url}/metrics"


def _present(samples: Samples, name: str) -> bool:
    kind = METRICS[name][0]
    wanted = f"{name}_count" if kind == "histogram" else name
    return any(sample == wanted for sample, _labels in samples)


def test_poolq_metrics_serves_a_live_pool(poolq_pools: PoolFactory, poolq_broker: str, tmp_path: Path) -> None:
    pool = poolq_pools.start("mq", AGENT, size=1, max_overflow=0, options={"redis_url": poolq_broker})
    client = pool.client
    for n in range(3):
        client.call("mq", marker=f"ok{n}")
    with pytest.raises(AgentError):
        client.call("mq", "boom", op="fail")
    with pytest.raises(UnknownOperation):
        client.call("mq", op="nosuch")

    with _exporter(poolq_pools, pool, tmp_path) as url:
        # Each worker flushes its call histograms with its heartbeat (every 2 s).
        samples = _scrape_until(
            url,
            "3 ok calls of handle",
            lambda s: _value(s, "poolq_calls_total", pool="mq", op="handle", outcome="ok") == 3,
        )
        missing = [name for name in METRICS if not _present(samples, name)]
        assert not missing, missing
        assert _value(samples, "poolq_up") == 1
        assert _value(samples, "poolq_pool_size", pool="mq") == 1
        assert _value(samples, "poolq_pool_max_overflow", pool="mq") == 0
        assert _value(samples, "poolq_pool_nodes", pool="mq") == 1
        assert _value(samples, "poolq_pool_state", pool="mq", state="ready") == 1
        assert _value(samples, "poolq_pool_state", pool="mq", state="degraded") == 0
        assert _value(samples, "poolq_agents", pool="mq", state="idle") == 1
        assert _value(samples, "poolq_pool_breaker_open", pool="mq") == 0
        assert _value(samples, "poolq_agents_spawned_total", pool="mq") == 1
        assert _value(samples, "poolq_requests_total", pool="mq") == 4  # 3 handle + fail; the unknown op never ran
        assert _value(samples, "poolq_calls_total", pool="mq", op="fail", outcome="agent") == 1
        assert _value(samples, "poolq_calls_total", pool="mq", op="(unknown)", outcome="unknown_operation") == 1
        assert _value(samples, "poolq_call_run_seconds_count", pool="mq", op="handle") == 3
        assert _value(samples, "poolq_call_run_seconds_bucket", pool="mq", op="handle", le="+Inf") == 3
        assert _value(samples, "poolq_call_queued_seconds_count", pool="mq", op="handle") == 3
        assert (_value(samples, "poolq_call_run_seconds_sum", pool="mq", op="handle") or -1) >= 0

        # A jammed pool: one call at work, four waiting in its queue.
        running = client.cast("mq", op="work", marker="long", sleep=4.0)
        pool.wait_for(lambda: any(a.state == "busy" for a in pool.agents()), timeout=10, what="a busy agent")
        queued = [client.cast("mq", op="work", marker=f"q{n}") for n in range(4)]
        samples = _scrape_until(url, "4 waiting", lambda s: _value(s, "poolq_pool_waiting", pool="mq") == 4, timeout=10)
        assert _value(samples, "poolq_pool_in_use", pool="mq") == 1
        assert _value(samples, "poolq_pool_available", pool="mq") == 0
        assert _value(samples, "poolq_pool_state", pool="mq", state="full") == 1
        running.result(timeout=20)
        for handle in queued:
            handle.result(timeout=20)
        samples = _scrape_until(url, "an empty queue", lambda s: _value(s, "poolq_pool_waiting", pool="mq") == 0)


def test_the_metrics_mount_in_wsgi_and_asgi_apps(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    pool = poolq_pools.start("mqapp", AGENT, size=1, options={"redis_url": poolq_broker})
    pool.client.call("mqapp")

    with httpx.Client(transport=httpx.WSGITransport(app=wsgi_app(pool.client)), base_url="http://app") as web:
        response = web.get("/metrics")
    assert response.status_code == 200
    wsgi = _samples(response.text)
    assert _value(wsgi, "poolq_up") == 1 and _value(wsgi, "poolq_pool_size", pool="mqapp") == 1

    async def scrape() -> httpx.Response:
        transport = httpx.ASGITransport(app=asgi_app(pool.client))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as web:
            return await web.get("/metrics")

    response = asyncio.run(scrape())
    assert response.status_code == 200
    asgi = _samples(response.text)
    assert _value(asgi, "poolq_up") == 1 and _value(asgi, "poolq_pool_available", pool="mqapp") == 1


def test_an_unreachable_state_store_is_poolq_up_0(tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text('[pools.gone]\nagent = "tests.agents:Probe"\n', encoding="utf-8")
    config = load_config(path, env={"POOLQ_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    client = Client(config)
    try:
        with httpx.Client(transport=httpx.WSGITransport(app=wsgi_app(client)), base_url="http://app") as web:
            started = time.monotonic()
            response = web.get("/metrics")
        assert response.status_code == 200  # a scrape never fails: it says what it could not read
        samples = _samples(response.text)
        assert _value(samples, "poolq_up") == 0
        assert _value(samples, "poolq_pool_size", pool="gone") is None
        assert time.monotonic() - started < 10
    finally:
        client.close()
