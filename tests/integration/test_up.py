"""F28: `poolq up` runs the whole stack from a project directory, with or without a broker."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from poolq.local.procs import alive, child_preexec, stop_process
from tests.cli_helpers import call_until_answered

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLQ_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh project directory holding the example configuration."""
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config" / "pools.toml", tmp_path / "config" / "pools.toml")
    return tmp_path


@contextmanager
def _up(project: Path, env: dict[str, str], *args: str) -> Iterator[subprocess.Popen[bytes]]:
    log = (project / "up.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "poolq", "up", *args],
        cwd=project,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=child_preexec,
    )
    try:
        yield process
    finally:
        stop_process(process, timeout=60)
        log.close()


def _call_until_answered(project: Path, env: dict[str, str], up: subprocess.Popen[bytes]) -> dict[str, object]:
    def log() -> str:
        return (project / "up.log").read_text()

    def check_up() -> None:
        assert up.poll() is None, log()

    return call_until_answered(project, env, "hi", check_up=check_up, log=log, timeout=90)


def test_up_on_a_machine_without_a_broker(project: Path) -> None:
    env = _env()
    with _up(project, env) as up:
        # When a client in the same directory calls the echo pool
        answer = _call_until_answered(project, env, up)
        assert answer["text"] == "hi"
        log = (project / "up.log").read_text()
        assert "(embedded, files in .poolq/)" in log
        broker_pid = int((project / ".poolq" / "broker.pid").read_text())
        children = [int(pid) for pid in re.findall(r"started \S+ \(pid (\d+)\)", log)]
        assert len(children) >= 3  # a worker per runnable pool, beat, flower
        assert "metrics http://127.0.0.1:" in log
        assert " succeeded in " not in log  # Celery's per-task lines are at WARNING by default
        broker_url = (project / ".poolq" / "broker.url").read_text()

        # Then Ctrl-C stops every process it started, the broker last
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0
        for pid in [*children, broker_pid]:
            assert not alive(pid), pid
        assert not (project / ".poolq" / "broker.url").exists()

    # A second run in the same directory comes back on the same port: web apps keep their URL.
    with _up(project, env, "--no-flower", "--no-beat", "--no-metrics") as up:
        assert _call_until_answered(project, env, up)["text"] == "hi"
        assert (project / ".poolq" / "broker.url").read_text() == broker_url


def test_up_uses_the_configured_broker(project: Path, poolq_broker: str) -> None:
    env = _env(POOLQ_BROKER_URL=poolq_broker)
    with _up(project, env, "--no-flower", "--no-beat") as up:
        assert _call_until_answered(project, env, up)["text"] == "hi"
        assert not (project / ".poolq" / "redis").exists()
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0


def test_second_up_in_the_same_directory_is_refused(project: Path, poolq_broker: str) -> None:
    env = _env(POOLQ_BROKER_URL=poolq_broker)
    with _up(project, env, "--no-flower", "--no-beat") as up:
        _call_until_answered(project, env, up)
        second = subprocess.run(
            [sys.executable, "-m", "poolq", "up"], cwd=project, env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1
        assert "AlreadyRunning" in second.stderr
