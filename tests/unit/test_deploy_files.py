"""The deploy files agree with each other, with config/pools.toml and with the CLI.

The Procfile and docker-compose.yml run the same processes under the same names with the
same argv. The one documented difference: the Procfile takes Flower's port from ``$PORT``
(honcho, foreman and Heroku set it), where compose fixes it (``${PORT:-5555}`` -> ``5555``).
Everything else (addresses, passwords) comes from the environment, identically named.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from honcho.environ import parse_procfile

from poolq import load_config
from poolq.cli import flower, maintainer, metrics
from poolq.config import DEFAULT_CALL_TIMEOUT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CONFIG = load_config(ROOT / "config" / "pools.toml", env={})
POOLS = sorted(CONFIG.pools)
#: Services of docker-compose.yml that are not poolq processes.
INFRA = {"redis"}
#: The Procfile's ``$PORT`` (set per process by honcho/foreman/Heroku) is a fixed port in compose.
NORMALIZE = {"${PORT:-5555}": "5555"}
#: Compose's form of a required variable: ``${NAME:?message}`` (compose refuses to start without it).
REQUIRED_VAR = r"\$\{%s:\?[^}]+\}"


# -- readers -------------------------------------------------------------------------------------


def procfile() -> dict[str, list[str]]:
    """The Procfile as honcho reads it: process name -> argv."""
    processes = parse_procfile((ROOT / "Procfile").read_text()).processes
    return {name: shlex.split(command) for name, command in processes.items()}


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"])


def poolq_services() -> dict[str, Any]:
    return {name: service for name, service in compose().items() if name not in INFRA}


def _normalize(argv: list[str]) -> list[str]:
    return [NORMALIZE.get(arg, arg) for arg in argv]


def dockerfile_stages() -> dict[str, dict[str, Any]]:
    """Each named stage: its base and its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            current = {"base": match.group(1), "instructions": []}
            stages[match.group(2)] = current
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current["instructions"].append((keyword, args.strip()))
    return stages


def stage_chain(name: str) -> list[dict[str, Any]]:
    """A stage and the stages it is built FROM, base first."""
    stages = dockerfile_stages()
    chain = [stages[name]]
    while chain[0]["base"] in stages:
        chain.insert(0, stages[chain[0]["base"]])
    return chain


def instructions(name: str, keyword: str) -> list[str]:
    return [args for stage in stage_chain(name) for kw, args in stage["instructions"] if kw == keyword]


def env_of(name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions(name, "ENV"):
        env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _seconds(duration: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def _option(command: click.Command, name: str) -> click.Parameter:
    return next(p for p in command.params if p.name == name)


# -- the Procfile and compose run the same processes ---------------------------------------------


@pytest.mark.parametrize("pool", POOLS)
def test_a_worker_per_pool_in_both_files(pool: str) -> None:
    assert procfile()[f"worker_{pool}"] == ["poolq", "worker", pool]
    assert compose()[f"worker_{pool}"]["command"] == ["poolq", "worker", pool]


def test_the_procfile_runs_a_worker_per_pool_and_each_service_once() -> None:
    expected = {f"worker_{pool}" for pool in POOLS} | {"maintainer", "beat", "flower", "metrics"}
    assert set(procfile()) == expected
    assert procfile()["maintainer"] == ["poolq", "maintainer"]
    assert procfile()["beat"] == ["poolq", "beat"]
    assert procfile()["metrics"] == ["poolq", "metrics"]
    assert procfile()["flower"] == ["poolq", "flower", "--port", "${PORT:-5555}"]


def test_both_files_run_the_same_processes_with_the_same_commands() -> None:
    services = poolq_services()
    assert set(services) == set(procfile())
    for name, argv in procfile().items():
        assert _normalize(argv) == services[name]["command"], name


def test_flower_and_metrics_listen_on_the_loopback_unless_the_environment_says_otherwise() -> None:
    # No --address in either file: the CLI's default (loopback) or the env var decides.
    for name in ("flower", "metrics"):
        assert "--address" not in procfile()[name]
        assert "--insecure" not in procfile()[name]
    assert _option(flower, "address").default == "127.0.0.1"
    assert _option(metrics, "address").default == "127.0.0.1"


# -- compose: Redis with a password, and nothing secret in the file ------------------------------


def test_redis_requires_the_password_and_its_healthcheck_uses_it() -> None:
    redis = compose()["redis"]
    command = redis["command"]
    assert re.fullmatch(REQUIRED_VAR % "REDIS_PASSWORD", command[command.index("--requirepass") + 1])
    assert re.fullmatch(REQUIRED_VAR % "REDIS_PASSWORD", redis["environment"]["REDISCLI_AUTH"])
    # redis-cli exits 0 on an error reply (NOAUTH): the check must look for PONG.
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli ping" in test and "PONG" in test
    assert "ports" not in redis  # reachable from the compose network only


def test_every_poolq_service_reaches_redis_with_the_password() -> None:
    url = re.compile(r"redis://:" + REQUIRED_VAR % "REDIS_PASSWORD" + r"@redis:6379/\d+")
    for name, service in poolq_services().items():
        assert url.fullmatch(service["environment"]["POOLQ_BROKER_URL"]), name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_no_secret_is_written_in_the_compose_file() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for name, service in compose().items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|AUTH|SECRET|TOKEN", key):
                assert re.fullmatch(REQUIRED_VAR % r"\w+", str(value)), f"{name}: {key} must come from the env"
        for value in _strings(service):
            for password in re.findall(r"://[^:/@\s]*:([^@\s]+)@", value):
                assert re.fullmatch(REQUIRED_VAR % r"\w+", password), f"{name}: a password in {value}"
    # A variable with a default (${X:-...}) would be a password that is written down.
    assert not re.search(r"\$\{\w*(PASSWORD|AUTH|SECRET|TOKEN)\w*:?-", text)


def test_flower_beyond_localhost_requires_a_password() -> None:
    service = compose()["flower"]
    env = service["environment"]
    assert _option(flower, "address").envvar == "POOLQ_FLOWER_ADDRESS"
    assert env["POOLQ_FLOWER_ADDRESS"] == "0.0.0.0"
    assert re.fullmatch(REQUIRED_VAR % "FLOWER_BASIC_AUTH", env["FLOWER_BASIC_AUTH"])
    assert "--insecure" not in service["command"]
    assert service["ports"] == ["127.0.0.1:5555:5555"]


def test_metrics_listens_in_its_container_and_is_published_on_the_loopback() -> None:
    service = compose()["metrics"]
    assert _option(metrics, "address").envvar == "POOLQ_METRICS_ADDRESS"
    assert service["environment"]["POOLQ_METRICS_ADDRESS"] == "0.0.0.0"
    port = _option(metrics, "port").default
    assert service["ports"] == [f"127.0.0.1:{port}:{port}"]


# -- compose: processes, images, healthchecks ----------------------------------------------------


def test_every_poolq_service_runs_under_an_init() -> None:
    for name, service in poolq_services().items():
        assert service.get("init") is True, name


def test_the_embed_worker_has_its_own_image_and_the_others_share_the_app_image() -> None:
    services = poolq_services()
    for name, service in services.items():
        target = "embed" if name == "worker_embed" else "app"
        assert service["build"]["target"] == target, name
        assert service["build"]["context"] == ".", name
    images = {name: service["image"] for name, service in services.items()}
    assert len({image for name, image in images.items() if name != "worker_embed"}) == 1
    assert images["worker_embed"] not in {image for name, image in images.items() if name != "worker_embed"}
    assert set(dockerfile_stages()) >= {"app", "embed"}


def test_every_service_has_a_healthcheck() -> None:
    for name, service in compose().items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


@pytest.mark.parametrize("pool", POOLS)
def test_a_worker_healthcheck_pings_its_own_node(pool: str) -> None:
    test = compose()[f"worker_{pool}"]["healthcheck"]["test"]
    # `poolq worker POOL` names its node POOL@%h: in a container, the container's hostname.
    assert test[0] == "CMD-SHELL"
    assert shlex.split(test[1])[:5] == ["celery", "-A", "poolq.app", "inspect", "ping"]
    assert f"--destination {pool}@$$HOSTNAME " in test[1] + " "


def test_the_maintainer_healthcheck_pings_its_own_node() -> None:
    test = compose()["maintainer"]["healthcheck"]["test"][1]
    assert _option(maintainer, "node").default == "maintainer@%h"
    assert "celery -A poolq.app inspect ping" in test
    assert "--destination maintainer@$$HOSTNAME " in test + " "


def test_the_celery_app_named_by_the_healthchecks_is_poolqs(tmp_path: Path) -> None:
    script = (
        "from celery.app.utils import find_app\n"
        "app = find_app('poolq.app')\n"
        "print(type(app).__name__, sorted(app.poolq_config.pools))\n"
    )
    env = {"POOLQ_CONFIG": str(ROOT / "config" / "pools.toml"), "POOLQ_BROKER_URL": "redis://127.0.0.1:9/0"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" ", 1) == ["Celery", f"{POOLS}\n"]


def test_flower_and_metrics_healthchecks_hit_their_own_endpoints() -> None:
    services = compose()
    flower_port = services["flower"]["command"][services["flower"]["command"].index("--port") + 1]
    assert f"http://127.0.0.1:{flower_port}/healthcheck" in " ".join(services["flower"]["healthcheck"]["test"])
    metrics_port = _option(metrics, "port").default
    assert f"http://127.0.0.1:{metrics_port}/metrics" in " ".join(services["metrics"]["healthcheck"]["test"])


def test_the_beat_healthcheck_reads_the_schedule_in_the_state_dir() -> None:
    test = " ".join(compose()["beat"]["healthcheck"]["test"])
    assert "POOLQ_STATE_DIR" in test and "celerybeat-schedule" in test


@pytest.mark.parametrize("pool", POOLS)
def test_a_worker_has_time_to_finish_its_calls_when_stopped(pool: str) -> None:
    service = compose()[f"worker_{pool}"]
    call_timeout = CONFIG.pool(pool).call_timeout or DEFAULT_CALL_TIMEOUT
    assert _seconds(service["stop_grace_period"]) > call_timeout


def test_beat_keeps_its_schedule_on_a_volume_at_the_images_state_dir() -> None:
    state_dir = env_of("app")["POOLQ_STATE_DIR"]
    volumes = compose()["beat"]["volumes"]
    assert any(v.split(":")[1] == state_dir and not v.startswith(("/", ".")) for v in volumes), volumes


# -- the Dockerfile ------------------------------------------------------------------------------


def test_the_embed_image_is_the_app_image_plus_pytorch() -> None:
    stages = dockerfile_stages()
    assert stages["embed"]["base"] == "app"
    assert not stages["app"]["base"].startswith(tuple(stages))  # app starts from a Python image
    runs = " ".join(args for kw, args in stages["embed"]["instructions"] if kw == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu torch" in runs
    assert "[embed]" in runs


def test_pytorch_is_only_in_the_embed_stage() -> None:
    for name, stage in dockerfile_stages().items():
        if name == "embed":
            continue
        text = " ".join(args for _, args in stage["instructions"]).lower()
        assert "torch" not in text and "[embed]" not in text, name


@pytest.mark.parametrize("pool", POOLS)
def test_each_workers_image_has_what_its_pool_requires(pool: str) -> None:
    """A pool's ``requires`` modules come from the extras its compose service's target installs."""
    target = compose()[f"worker_{pool}"]["build"]["target"]
    extras = set(re.findall(r"\[(\w+)\]", " ".join(instructions(target, "RUN"))))
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    provided = {
        re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0].lower().replace("-", "_")
        for extra in extras
        for requirement in optional[extra]
    }
    assert set(CONFIG.pool(pool).requires) <= provided, (target, extras)


@pytest.mark.parametrize("stage", ["app", "embed"])
def test_the_images_run_as_a_non_root_user(stage: str) -> None:
    users = instructions(stage, "USER")
    assert users and users[-1] not in ("root", "0"), users
    creates = [run.split("&&")[0].strip() for run in instructions(stage, "RUN")]
    assert any(re.fullmatch(rf"useradd\b.*\b{users[-1]}", run) for run in creates), creates


def test_the_state_dir_is_set_and_owned_by_the_images_user() -> None:
    env = env_of("app")
    state_dir = env["POOLQ_STATE_DIR"]
    user = instructions("app", "USER")[-1]
    runs = " ".join(instructions("app", "RUN"))
    assert f"mkdir -p {state_dir}" in runs
    assert f"chown {user}:{user} {state_dir}" in runs


def test_the_image_keeps_the_project_dir_where_agents_are_found() -> None:
    # `poolq` puts its working directory on sys.path (agents are not packaged): the image's
    # WORKDIR must hold every agent's package and the configuration POOLQ_CONFIG names.
    workdir = instructions("app", "WORKDIR")[-1]
    copies = [args.split() for args in instructions("app", "COPY") if not args.startswith("--from")]
    copied = {dest.rstrip("/").removeprefix("./"): src for src, dest in copies}
    for pool in CONFIG.pools.values():
        package = pool.agent.split(".")[0].split(":")[0]
        assert copied.get(package) == package, pool.agent
    assert copied.get("config") == "config"
    env = env_of("app")
    assert env["POOLQ_CONFIG"] == f"{workdir}/config/pools.toml"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_the_docker_context_leaves_out_secrets_the_virtualenv_and_git() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git", ".poolq"} <= set(ignored)


# -- docker-compose.yml against the Compose Specification ----------------------------------------


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    # The compose-spec schema ships inside check-jsonschema: no network is needed.
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_matches_the_compose_spec() -> None:
    done = _check_compose(ROOT / "docker-compose.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_compose_spec_check_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    text = (ROOT / "docker-compose.yml").read_text()
    broken.write_text(text.replace("stop_grace_period:", "stop_grace_periods:", 1))
    done = _check_compose(broken)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "stop_grace_periods" in done.stdout
