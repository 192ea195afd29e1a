"""Shared fixtures: the embedded broker comes from the poolq plugin (poolq.testing)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis

from poolq.testing import PoolFactory

ROOT = Path(__file__).resolve().parent.parent
#: The RabbitMQ of the RabbitMQ tests (CI and this project's machines run one on 5672).
AMQP_URL = os.environ.get("POOLQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _reachable(url: str) -> bool:
    parts = urlparse(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=2).close()
    except OSError:
        return False
    return True


_RABBITMQ_LISTENS = _reachable(AMQP_URL)


@pytest.fixture
def rabbitmq_listens() -> None:
    """Skip, with the reason printed, where no RabbitMQ listens; fail instead with ``POOLQ_REQUIRE_RABBITMQ=1``.

    ``.ci/run`` sets that once it saw RabbitMQ's port open: there these tests must run, not skip.
    """
    if _RABBITMQ_LISTENS:
        return
    reason = f"no RabbitMQ at {AMQP_URL}"
    if os.environ.get("POOLQ_REQUIRE_RABBITMQ") == "1":
        pytest.fail(f"POOLQ_REQUIRE_RABBITMQ=1, but {reason}")
    pytest.skip(reason)


#: Marks a module or test that needs RabbitMQ (see :func:`rabbitmq_listens`).
needs_rabbitmq = pytest.mark.usefixtures("rabbitmq_listens")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="also run the long soak tests (marker: soak)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="a soak test: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def state(poolq_broker: str) -> Iterator[redis.Redis]:
    """A Redis client on the test broker, for reading what test agents recorded."""
    client = redis.Redis.from_url(poolq_broker, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="module")
def module_pools(poolq_broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolFactory]:
    """A pool factory whose workers live for the whole test module."""
    factory = PoolFactory(poolq_broker, tmp_path_factory.mktemp("pools"), pythonpath=[str(ROOT)])
    yield factory
    factory.stop_all()


@pytest.fixture
def rabbit(poolq_broker: str, tmp_path: Path) -> Iterator[PoolFactory]:
    """Nodes on RabbitMQ, with the test's Redis as their state store."""
    factory = PoolFactory(AMQP_URL, tmp_path, pythonpath=[str(ROOT)], state_url=poolq_broker)
    yield factory
    factory.stop_all()
