"""Fixtures of the reliability suite: a broker the test may stop and restart, and a ledger of executions."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from poolq.local.embedded import EmbeddedRedis
from poolq.testing import PoolFactory, WorkerProcess
from tests.conftest import ROOT
from tests.reliability.agents import Ledger

AGENT = "tests.reliability.agents:Ledgered"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A private broker (persistent: append-only file) that the test may stop and start on the same port."""
    server = EmbeddedRedis(tmp_path / "broker", persist=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pools(broker: EmbeddedRedis, tmp_path: Path) -> Iterator[PoolFactory]:
    """Worker nodes on the private broker, stopped (by pid) when the test ends."""
    factory = PoolFactory(broker.url, tmp_path, pythonpath=[str(ROOT)])
    yield factory
    factory.stop_all()


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.txt")


def kill_node(worker: WorkerProcess) -> None:
    """SIGKILL a whole node: its main process and every child (its process group), as a lost host would."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.process.wait(timeout=10)
    worker.log_file.close()
