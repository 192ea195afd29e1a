"""Helpers of the tests that run poolq's command line against a whole stack (``poolq up``, the Procfile)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path


def call_until_answered(
    cwd: Path,
    env: Mapping[str, str],
    text: str,
    *,
    check_up: Callable[[], None],
    log: Callable[[], str],
    timeout: float,
) -> dict[str, object]:
    """Run ``poolq call echo '{"text": TEXT}'`` until it answers; its answer.

    Before each try ``check_up()`` asserts that the stack still runs; after
    ``timeout`` seconds without an answer, fail with the last try's stderr and ``log()``.
    """
    deadline = time.monotonic() + timeout
    while True:
        check_up()
        done = subprocess.run(
            [sys.executable, "-m", "poolq", "call", "echo", json.dumps({"text": text}), "--timeout", "2"],
            cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if done.returncode == 0:
            return dict(json.loads(done.stdout))
        assert time.monotonic() < deadline, f"{done.stderr}\n{log()}"
        time.sleep(0.5)
