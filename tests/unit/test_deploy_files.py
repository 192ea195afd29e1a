"""F28: the Procfile and docker-compose.yml start the same processes, and match the config."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from poolq import load_config

ROOT = Path(__file__).resolve().parents[2]
POOLS = sorted(load_config(ROOT / "config" / "pools.toml", env={}).pools)


def procfile() -> dict[str, list[str]]:
    processes = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            processes[name.strip()] = shlex.split(command)
    return processes


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"])


def _normalize(argv: list[str]) -> list[str]:
    # The Procfile takes Flower's port from $PORT (Heroku); compose fixes it.
    return ["5555" if arg == "${PORT:-5555}" else arg for arg in argv]


@pytest.mark.parametrize("pool", POOLS)
def test_a_worker_per_pool_in_both_files(pool: str) -> None:
    assert procfile()[f"worker_{pool}"] == ["poolq", "worker", pool]
    assert compose()[f"worker_{pool}"]["command"] == ["poolq", "worker", pool]


def test_beat_maintainer_and_flower_in_both_files() -> None:
    assert procfile()["beat"] == ["poolq", "beat"]
    assert compose()["beat"]["command"] == ["poolq", "beat"]
    assert procfile()["maintainer"] == ["poolq", "maintainer"]
    assert compose()["maintainer"]["command"] == ["poolq", "maintainer"]
    assert procfile()["flower"][:2] == compose()["flower"]["command"][:2] == ["poolq", "flower"]


def test_both_files_run_the_same_processes_with_the_same_commands() -> None:
    services = {name: s for name, s in compose().items() if name != "redis"}
    assert set(services) == set(procfile())
    for name, argv in procfile().items():
        assert _normalize(argv) == services[name]["command"], name


def test_compose_runs_redis_and_points_every_service_at_it() -> None:
    services = compose()
    assert services["redis"]["image"].startswith("redis:")
    for name, service in services.items():
        if name == "redis":
            continue
        assert service["environment"]["POOLQ_BROKER_URL"].startswith("redis://redis:6379/"), name
        assert "redis" in service["depends_on"], name


def test_flower_beyond_localhost_requires_a_password() -> None:
    flower = compose()["flower"]
    assert "--address" in flower["command"] and "0.0.0.0" in flower["command"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])
