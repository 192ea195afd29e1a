"""The bench in tiny sizes, so it never rots: every scenario runs and reports plain numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

REQUIRED = {
    "call": {
        "poolq_p50_ms",
        "poolq_p99_ms",
        "celery_p50_ms",
        "celery_p99_ms",
        "ratio_p50",
        "redis_floor_ms",
        "solo_p50_ms",
    },
    "cast": {"poolq_per_s", "celery_per_s", "ratio"},
    "warm_vs_cold": {"warm_p50_ms", "cold_p50_ms", "ratio"},
    "acall": {"n", "wall_s", "per_s"},
    "scale_up": {"time_to_max_s", "makespan_s", "ideal_s", "makespan_ratio"},
    "recycling": {"steady_p99_ms", "recycling_p99_ms", "ratio_p99", "lost", "duplicated"},
    "machine": {"cores", "python", "celery", "redis_server"},
}


def test_quick_bench_reports_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    for scenario, keys in REQUIRED.items():
        assert keys <= results[scenario].keys(), scenario
        for key in keys - {"python", "celery", "redis_server"}:
            value = results[scenario][key]
            assert isinstance(value, (int, float)) and value >= 0, (scenario, key, value)
    # Correctness, not speed: the recycling run loses and repeats nothing.
    assert results["recycling"]["lost"] == 0
    assert results["recycling"]["duplicated"] == 0
    for scenario in REQUIRED.keys() - {"machine"}:
        assert scenario in done.stdout
