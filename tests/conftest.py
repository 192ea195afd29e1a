"""Shared fixtures: the embedded broker comes from the poolq plugin (poolq.testing)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from poolq.testing import PoolFactory

ROOT = Path(__file__).resolve().parent.parent


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
