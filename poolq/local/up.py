"""``poolq up``: the whole stack on one machine, in the foreground.

With no broker configured it starts the embedded broker (files under
``.poolq/``) and writes its URL to ``.poolq/broker.url``, where clients in the
same project directory find it; a restart in the same directory takes the same
port again (``.poolq/broker.port``), so running web apps keep a working URL.
Then it supervises one worker per pool, the maintainer, beat, the metrics
endpoint and Flower until Ctrl-C, and stops the broker last.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil
import redis

from ..agent import missing_requirements
from ..config import BROKER_URL_FILE, Config, redact
from ..errors import AlreadyRunning
from ..metrics import DEFAULT_PORT as METRICS_PORT
from ..store import registry
from ..store.connection import connect
from .embedded import EmbeddedRedis, free_port
from .procs import alive, stop_pid
from .supervisor import Service, Supervisor

#: Flower's usual port, used when free.
FLOWER_PORT = 5555

UP_PIDFILE = "up.pid"
BROKER_PIDFILE = "broker.pid"
#: The embedded broker's port, kept after a stop: the next start takes it again when free.
BROKER_PORT_FILE = "broker.port"
#: The level of Celery's per-call log lines under ``poolq up`` (INFO would print two lines per call).
TASK_LOGLEVEL = "WARNING"


@dataclass(frozen=True)
class Plan:
    """What ``poolq up`` will run."""

    services: list[Service]
    skipped: dict[str, str]
    flower_port: int | None
    metrics_port: int | None


def plan(config: Config, flower: bool = True, beat: bool = True, metrics: bool = True) -> Plan:
    """The services for ``config``: a worker per runnable pool, the maintainer, beat, metrics, Flower."""
    python = [sys.executable, "-m", "poolq"]
    services: list[Service] = []
    skipped: dict[str, str] = {}
    for pool in config.pools.values():
        missing = missing_requirements(pool)
        if missing:
            skipped[pool.name] = f"needs {', '.join(missing)} (not installed)"
            continue
        services.append(Service(f"worker.{pool.name}", [*python, "worker", pool.name], tier=1))
    flower_port = metrics_port = None
    if beat:
        services.append(Service("maintainer", [*python, "maintainer"], tier=1, stop_timeout=30))
        services.append(Service("beat", [*python, "beat"], tier=2, stop_timeout=10))
    if metrics:
        metrics_port = free_port(METRICS_PORT)
        services.append(Service("metrics", [*python, "metrics", "--port", str(metrics_port)], tier=2, stop_timeout=5))
    if flower:
        flower_port = free_port(FLOWER_PORT)
        services.append(Service("flower", [*python, "flower", "--port", str(flower_port)], tier=2, stop_timeout=10))
    return Plan(services=services, skipped=skipped, flower_port=flower_port, metrics_port=metrics_port)


def run(config: Config, out: IO[str], flower: bool = True, beat: bool = True, metrics: bool = True) -> int:
    """Run the stack until Ctrl-C; the exit code."""
    state_dir = config.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    _claim_directory(state_dir)
    broker: EmbeddedRedis | None = None
    try:
        url = config.env_broker_url or config.project.broker_url
        if not url:
            _stop_stale_broker(state_dir)
            broker = EmbeddedRedis(state_dir / "redis", port=free_port(_last_port(state_dir)))
            url = broker.start()
            (state_dir / BROKER_PIDFILE).write_text(str(broker.pid), encoding="utf-8")
            (state_dir / BROKER_PORT_FILE).write_text(str(broker.port), encoding="utf-8")
            (state_dir / BROKER_URL_FILE).write_text(url, encoding="utf-8")
        stack = plan(config, flower=flower, beat=beat, metrics=metrics)
        env = {
            **os.environ,
            "POOLQ_BROKER_URL": url,
            "POOLQ_CONFIG": str(config.path.resolve()),
            "POOLQ_STATE_DIR": str(state_dir),
            "POOLQ_SKIP_POOLS": ",".join(sorted(stack.skipped)),
            "POOLQ_TASK_LOGLEVEL": os.environ.get("POOLQ_TASK_LOGLEVEL", TASK_LOGLEVEL),
            "PYTHONUNBUFFERED": "1",
        }
        _mark_skipped(config, stack.skipped, out)
        supervisor = Supervisor(stack.services, env=env, out=out)
        _banner(supervisor, config, url, broker is not None, stack)
        return supervisor.run()
    finally:
        if broker is not None:
            broker.stop()
        for name in (BROKER_URL_FILE, BROKER_PIDFILE, UP_PIDFILE):
            (state_dir / name).unlink(missing_ok=True)


def _banner(supervisor: Supervisor, config: Config, url: str, embedded: bool, stack: Plan) -> None:
    where = f" (embedded, files in {config.state_dir}/)" if embedded else ""
    supervisor.log("poolq", f"broker {redact(url)}{where}")
    for pool in config.pools.values():
        if pool.name in stack.skipped:
            supervisor.log("poolq", f"pool {pool.name}: skipped, {stack.skipped[pool.name]}")
        else:
            supervisor.log("poolq", f"pool {pool.name}: {pool.size} agent(s) of {pool.agent}")
    if stack.flower_port:
        supervisor.log("poolq", f"flower http://127.0.0.1:{stack.flower_port}")
    if stack.metrics_port:
        supervisor.log("poolq", f"metrics http://127.0.0.1:{stack.metrics_port}/metrics")
    supervisor.log("poolq", 'send work with: poolq call POOL \'{"key": "value"}\'   (Ctrl-C stops everything)')


def _last_port(state_dir: Path) -> int | None:
    try:
        return int((state_dir / BROKER_PORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _mark_skipped(config: Config, skipped: dict[str, str], out: IO[str]) -> None:
    """Mark the pools that will not run as ``skipped`` (status shows why; calls fail at once)."""
    if not skipped:
        return
    state = connect(config.state_url)
    try:
        for pool, reason in skipped.items():
            registry.mark_skipped(state, pool, reason)
    except redis.RedisError as exc:
        out.write(f"poolq: could not mark the skipped pools in the state store: {exc}\n")
    finally:
        state.close()


def _claim_directory(state_dir: Path) -> None:
    pidfile = state_dir / UP_PIDFILE
    try:
        pid = int(pidfile.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pid = 0
    if pid and pid != os.getpid() and alive(pid):
        raise AlreadyRunning(f"poolq up already runs for {state_dir} (pid {pid}); stop it first")
    pidfile.write_text(str(os.getpid()), encoding="utf-8")


def _stop_stale_broker(state_dir: Path) -> None:
    """Stop an embedded broker that a crashed ``poolq up`` left behind."""
    try:
        pid = int((state_dir / BROKER_PIDFILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    # Only a process serving our own data directory: a recycled pid is left alone.
    if alive(pid) and _cwd(pid) == str(state_dir / "redis"):
        stop_pid(pid)


def _cwd(pid: int) -> str:
    try:
        return str(psutil.Process(pid).cwd())
    except psutil.Error:
        return ""
