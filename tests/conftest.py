"""Shared fixtures: the embedded broker comes from the poolq plugin (poolq.testing)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from poolq.testing import PoolFactory

ROOT = Path(__file__).resolve().parent.parent


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
