"""The layout keeps its promises: a web process loads no worker code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_client_and_its_app_load_no_worker_code() -> None:
    script = (
        "import json, sys, poolq\n"
        "poolq.Client().app\n"
        "from celery import signals\n"
        "worker = ('poolq.worker', 'billiard.pool', 'celery.worker.control')\n"
        "loaded = [m for m in sys.modules if m.startswith(worker)]\n"
        "print(json.dumps({'loaded': loaded, 'signals': len(signals.worker_process_init.receivers)}))\n"
    )
    env = {
        **os.environ,
        "POOLQ_CONFIG": str(ROOT / "config" / "pools.toml"),
        # Nothing is sent: the address only has to be well formed.
        "POOLQ_BROKER_URL": "redis://127.0.0.1:9/0",
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) == {"loaded": [], "signals": 0}
