"""pytest fixtures that run real pools of your agents (the ``poolq`` pytest plugin).

Installed with poolq (entry point ``pytest11``), so in any project::

    def test_my_agent(poolq_pools):
        pool = poolq_pools.start("summarize", "myapp.agents:Summarizer", size=2)
        assert pool.client.call("summarize", text="...")["summary"]

``poolq_broker`` (session scope) starts the embedded broker once; set
``POOLQ_TEST_BROKER_URL`` to use a running one instead. ``poolq_pools`` starts
real ``poolq worker`` processes (one per node) against it, waits until their
agents are warm, and stops every process it started, by pid, when the test
ends. :class:`PoolFactory` is the same thing for fixtures of wider scope.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import amqp.exceptions
import pytest

from .client import Client
from .config import Config, load_config
from .local.embedded import EmbeddedRedis, free_port
from .local.procs import child_preexec, stop_process
from .store import keys, registry
from .store.records import AgentRecord

__all__ = ["PoolFactory", "RunningPool", "WorkerProcess", "app_server", "free_port", "render_config"]

#: Seconds a pool gets to warm up before the fixture fails.
READY_TIMEOUT = 60.0


@dataclass
class WorkerProcess:
    """One ``poolq worker`` node started by a fixture."""

    node: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """Warm shutdown (SIGTERM): in-flight calls finish; SIGKILL after ``timeout``."""
        try:
            return stop_process(self.process, timeout=timeout)
        finally:
            self.log_file.close()

    def kill(self) -> None:
        """SIGKILL the node's main process (its pool children die with it)."""
        try:
            stop_process(self.process, timeout=0, sig=signal.SIGKILL)
        finally:
            self.log_file.close()


@dataclass
class RunningPool:
    """A pool with live worker processes, and a client configured for it."""

    name: str
    config: Config
    client: Client
    size: int
    workers: list[WorkerProcess] = field(default_factory=list)
    #: Beat and the maintenance worker, when started.
    services: list[WorkerProcess] = field(default_factory=list)

    def agents(self) -> list[AgentRecord]:
        """The registry's records of this pool's live agents."""
        return registry.snapshot(self.client.state, self.name).agents

    def wait_for(self, condition: Callable[[], bool], timeout: float = READY_TIMEOUT, what: str = "condition") -> None:
        """Poll ``condition`` until it holds; fail with the workers' logs after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            for worker in self.workers:
                if worker.process.poll() is not None:
                    raise RuntimeError(
                        f"worker {worker.node} exited ({worker.process.returncode}):\n{worker.log()[-4000:]}"
                    )
            if time.monotonic() > deadline:
                logs = "\n".join(w.log()[-3000:] for w in self.workers)
                raise TimeoutError(f"pool {self.name}: {what} not reached in {timeout:g}s\n{logs}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until every node consumes and every agent is set up (idle or failed)."""

        def ready() -> bool:
            nodes = registry.snapshot(self.client.state, self.name).nodes
            settled = [a for a in self.agents() if a.state in ("idle", "failed")]
            mine = {w.node for w in self.workers}
            return sum(1 for n in nodes if n.id in mine and n.state == "ready") == len(self.workers) and len(
                settled
            ) >= self.size * len(self.workers)

        self.wait_for(ready, timeout, what=f"{self.size * len(self.workers)} ready agents")


class PoolFactory:
    """Starts pools of real worker processes against one broker, and stops them.

    Parameters:
        broker_url: the broker (and state Redis) the workers and client use.
        directory: where configs and worker logs are written.
        pythonpath: folders the workers need to import the agents from.
        state_url: the state Redis, when the broker is not one (RabbitMQ).
    """

    def __init__(
        self, broker_url: str, directory: Path, pythonpath: list[str] | None = None, state_url: str | None = None
    ) -> None:
        self.broker_url = broker_url
        self.state_url = state_url
        self.directory = Path(directory)
        self.pythonpath = pythonpath or []
        self.pools: list[RunningPool] = []

    def start(
        self,
        name: str,
        agent: str,
        *,
        nodes: int = 1,
        wait: bool = True,
        ready_timeout: float = READY_TIMEOUT,
        env: Mapping[str, str] | None = None,
        **keys: Any,
    ) -> RunningPool:
        """Configure pool ``name`` for ``agent`` (``module:Class``) and start ``nodes`` workers.

        ``keys`` are the pool's configuration keys (``size``, ``options``, ...).
        """
        path = self.directory / f"{name}.toml"
        path.write_text(render_config(name, {"agent": agent, **keys}), encoding="utf-8")
        config = load_config(path, env=self._urls())
        client = Client(config)
        _purge(client, name)
        pool = RunningPool(name=name, config=config, client=client, size=config.pool(name).size)
        self.pools.append(pool)
        for _ in range(nodes):
            self.add_node(pool, env=env, wait=False)
        if wait:
            pool.wait_ready(ready_timeout)
        return pool

    def add_node(
        self, pool: RunningPool, node: str | None = None, env: Mapping[str, str] | None = None, wait: bool = True
    ) -> WorkerProcess:
        """Start one more worker node for ``pool``."""
        node = node or f"{pool.name}{len(pool.workers) + 1}@poolq-test"
        log_path = self.directory / f"{node.replace('@', '_')}.log"
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "poolq", "worker", pool.name, "--name", node],
            env=self.environment(pool, env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=child_preexec,
        )
        worker = WorkerProcess(node=node, process=process, log_path=log_path, log_file=log_file)
        pool.workers.append(worker)
        if wait:
            pool.wait_ready()
        return worker

    def start_maintenance(self, pool: RunningPool) -> None:
        """Start beat and the maintenance worker for ``pool`` (its maintenance runs on schedule)."""
        for name, argv in (
            ("maintainer", ["maintainer", "--name", f"maintainer-{pool.name}@poolq-test"]),
            ("beat", ["beat"]),
        ):
            log_path = self.directory / f"{pool.name}-{name}.log"
            log_file = log_path.open("wb")
            process = subprocess.Popen(
                [sys.executable, "-m", "poolq", *argv],
                env={**self.environment(pool), "POOLQ_STATE_DIR": str(self.directory / f"{pool.name}-state")},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=child_preexec,
            )
            pool.services.append(WorkerProcess(node=name, process=process, log_path=log_path, log_file=log_file))

    def stop_all(self) -> None:
        """Stop every process this factory started (warm shutdown, then SIGKILL)."""
        for pool in self.pools:
            for service in pool.services:
                service.stop(timeout=20)
            for worker in pool.workers:
                worker.stop()
            pool.client.close()
        self.pools.clear()

    def environment(self, pool: RunningPool, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a process that uses ``pool``: a worker, or your web app under test."""
        paths = [*self.pythonpath, os.environ.get("PYTHONPATH", "")]
        return {
            **os.environ,
            "POOLQ_CONFIG": str(pool.config.path),
            **self._urls(),
            "PYTHONPATH": os.pathsep.join(p for p in paths if p),
            "PYTHONUNBUFFERED": "1",
            **(extra or {}),
        }

    def _urls(self) -> dict[str, str]:
        urls = {"POOLQ_BROKER_URL": self.broker_url}
        if self.state_url:
            urls["POOLQ_STATE_URL"] = self.state_url
        return urls


@contextlib.contextmanager
def app_server(
    argv: list[str], port: int, env: Mapping[str, str], log_path: Path, ready_timeout: float = READY_TIMEOUT
) -> Iterator[str]:
    """Run a web app server (``argv``, listening on 127.0.0.1:``port``); yield its base URL.

    Ready once it answers HTTP at all; stopped by pid (SIGTERM, then SIGKILL) on exit::

        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "myapp:app", "--host", "127.0.0.1", "--port", str(port)]
        with app_server(argv, port, poolq_pools.environment(pool), tmp_path / "app.log") as url:
            assert httpx.post(f"{url}/summarize", json={"text": "..."}).status_code == 200
    """
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=child_preexec,
        )
        try:
            deadline = time.monotonic() + ready_timeout
            while not _answers(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    output = log_path.read_text(errors="replace")[-4000:]
                    raise RuntimeError(f"app server {argv} did not start:\n{output}")
                time.sleep(0.1)
            yield url
        finally:
            stop_process(process, timeout=15)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError as error:
        error.close()  # it holds the response's socket
        return True  # any HTTP answer means it listens
    except OSError:
        return False
    return True


def render_config(name: str, keys: Mapping[str, Any]) -> str:
    """A ``pools.toml`` with one pool (values: strings, numbers, booleans, lists, tables)."""
    lines = [f"[pools.{name}]"]
    lines += [f"{key} = {_toml(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def _purge(client: Client, pool: str) -> None:
    """Empty the pool's queue and registry left by an earlier test."""
    # RabbitMQ: a queue not declared yet holds nothing to purge.
    with client.app.connection_for_write() as connection, contextlib.suppress(amqp.exceptions.NotFound):
        connection.default_channel.queue_purge(client.config.pool(pool).queue)
    client.state.delete(*keys.pool_keys(pool))


@pytest.fixture(scope="session")
def poolq_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The broker URL: ``$POOLQ_TEST_BROKER_URL``, or an embedded broker for the session."""
    url = os.environ.get("POOLQ_TEST_BROKER_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("poolq-broker"), persist=False)
    yield server.start()
    server.stop()


@pytest.fixture
def poolq_pools(poolq_broker: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PoolFactory]:
    """A :class:`PoolFactory` whose workers are stopped when the test ends."""
    factory = PoolFactory(poolq_broker, tmp_path, pythonpath=[str(request.config.rootpath)])
    yield factory
    factory.stop_all()
