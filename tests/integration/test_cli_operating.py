"""What an operator meets first on the command line: exit codes, skipped pools, --watch, the options' places."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from poolq import PoolClosed
from poolq.cli import EXIT_DEGRADED, main
from poolq.testing import PoolFactory, render_config

AGENT = "tests.agents:Probe"
ROOT = Path(__file__).resolve().parents[2]


def _poolq(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poolq", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_status_exits_3_while_a_pool_is_degraded(
    poolq_pools: PoolFactory, poolq_broker: str, state: redis.Redis
) -> None:
    state.set("test:clibroken:fail_setup", 1)
    try:
        pool = poolq_pools.start(
            "clibroken", AGENT, size=1, breaker_failures=1, breaker_reset=60,
            options={"redis_url": poolq_broker}, wait=False,
        )  # fmt: skip
        pool.wait_for(lambda: bool(pool.client.status("clibroken").degraded_by), timeout=60, what="breaker open")
        env = poolq_pools.environment(pool)
        shown = _poolq(env, "status", "clibroken")
        assert shown.returncode == EXIT_DEGRADED, shown.stderr
        assert "pool clibroken: degraded" in shown.stdout
        assert "degraded by: " in shown.stdout and "setup failed on purpose" in shown.stdout
        as_json = _poolq(env, "status", "clibroken", "--json")
        assert as_json.returncode == EXIT_DEGRADED
        assert json.loads(as_json.stdout)[0]["state"] == "degraded"
    finally:
        state.delete("test:clibroken:fail_setup")


def test_a_worker_whose_pool_needs_a_missing_module_stays_up_and_the_pool_shows_skipped(
    poolq_pools: PoolFactory, poolq_broker: str
) -> None:
    pool = poolq_pools.start(
        "cliskip", AGENT, size=1, requires=["no_such_module_for_poolq"], options={"redis_url": poolq_broker},
        wait=False,
    )  # fmt: skip
    [worker] = pool.workers
    pool.wait_for(lambda: pool.client.status("cliskip").state == "skipped", timeout=30, what="skipped")
    log = worker.log()
    assert "no_such_module_for_poolq" in log and "Traceback" not in log
    assert worker.process.poll() is None  # idles: a Procfile or compose stack is not taken down

    status = pool.client.status("cliskip")
    assert "no_such_module_for_poolq" in (status.skipped_because or "")
    shown = _poolq(poolq_pools.environment(pool), "status", "cliskip")
    assert shown.returncode == 0, shown.stderr  # skipped on purpose is not degraded
    assert "pool cliskip: skipped" in shown.stdout and "skipped: " in shown.stdout
    started = time.monotonic()
    with pytest.raises(PoolClosed, match="no_such_module_for_poolq"):
        pool.client.call("cliskip", timeout=10)
    assert time.monotonic() - started < 2  # refused at once, not after the timeout

    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=30) == 0


def test_status_watch_redraws_until_interrupted(poolq_pools: PoolFactory, poolq_broker: str, tmp_path: Path) -> None:
    pool = poolq_pools.start("cliwatch", AGENT, size=1, options={"redis_url": poolq_broker})
    out = (tmp_path / "watch.out").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "poolq", "status", "cliwatch", "--watch", "--interval", "0.3"],
        env=poolq_pools.environment(pool), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while Path(out.name).read_text().count("pool cliwatch: ready") < 3:
            assert process.poll() is None, Path(out.name).read_text()
            assert time.monotonic() < deadline, Path(out.name).read_text()
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        assert "every 0.3s" in Path(out.name).read_text()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        out.close()


def test_config_before_the_subcommand_and_dash_h(tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(render_config("early", {"agent": AGENT}))
    runner = CliRunner()
    result = runner.invoke(main, ["--config", str(path), "pools"])
    assert result.exit_code == 0, result.output
    assert "early" in result.output
    assert runner.invoke(main, ["pools", "--config", str(path)]).output == result.output
    for args in (["-h"], ["status", "-h"], ["flower", "-h"]):
        shown = runner.invoke(main, args)
        assert shown.exit_code == 0 and "Usage:" in shown.output, args


@pytest.mark.parametrize("address", ["0.0.0.0", "192.0.2.10", "::"])
def test_flower_beyond_loopback_needs_a_password(address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    monkeypatch.delenv("FLOWER_AUTH", raising=False)
    config = str(ROOT / "config" / "pools.toml")
    result = CliRunner().invoke(main, ["flower", "--config", config, "--address", address])
    assert result.exit_code == 2
    assert "--basic-auth" in result.output and "--insecure" in result.output


def test_metrics_on_a_taken_port_is_one_line(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        env = {**os.environ, "POOLQ_CONFIG": str(ROOT / "config" / "pools.toml")}
        done = _poolq(env, "metrics", "--port", str(taken.getsockname()[1]), timeout=30)
    finally:
        taken.close()
    assert done.returncode == 1
    assert "cannot listen on 127.0.0.1:" in done.stderr and "Traceback" not in done.stderr
