"""Bare Celery: the same work as the poolq benchmarks, on the same broker and worker settings.

Run as ``celery -A bench.bare worker -Q bench.bare ...`` with ``BENCH_BROKER_URL`` set.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from bench.agents import Heavy

QUEUE = "bench.bare"

app = Celery("bare", broker=os.environ.get("BENCH_BROKER_URL", ""), backend=os.environ.get("BENCH_BROKER_URL", ""))
app.conf.update(
    # The delivery settings poolq uses (poolq.app.celery_settings).
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE,
    worker_send_task_events=True,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.echo")
def echo(value: Any = None) -> Any:
    return value


@app.task(name="bench.sleep")
def sleep(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


@app.task(name="bench.cold")
def cold(value: Any = None) -> Any:
    """Build the agent for this one request: what a pool saves."""
    agent = Heavy({"setup_seconds": float(os.environ.get("BENCH_SETUP_SECONDS", "1.0"))})
    agent.setup()
    return agent.handle(value)
