"""F3: pools.toml validated at load; one clear error naming file, pool and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from poolq import BrokerNotConfigured, ConfigError, UnknownPool, load_config

GOOD = """
[poolq]
result_expires = 600

[pools.echo]
agent = "workers.echo:Echo"
size = 2
max_overflow = 1

[pools.echo.options]
greeting = "hi"

[pools.other]
agent = "tests.agents:Probe"

[pools.threaded]
agent = "tests.agents:Probe"
worker_pool = "threads"
strategy = "fifo"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pools.toml"
    path.write_text(text)
    return path


def test_a_good_file_becomes_typed_pools(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={})
    echo = config.pool("echo")
    assert (echo.size, echo.max_overflow, echo.strategy, echo.concurrency) == (2, 1, None, 3)
    assert echo.options == {"greeting": "hi"}
    assert echo.queue == "poolq.echo" and echo.task_name == "poolq.echo"
    other = config.pool("other")
    assert (other.size, other.max_overflow, other.strategy, other.worker_pool) == (1, 0, None, "prefork")
    assert (config.pool("threaded").handout, other.handout) == ("fifo", "lifo")
    assert config.project.result_expires == 600


def test_the_repository_config_is_valid() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "config" / "pools.toml", env={})
    assert {"echo", "embed"} <= set(config.pools)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            'agent = "workers.echo:Echo"\nsize = 0',
            "pool 'echo', key 'size': Input should be greater than or equal to 1",
        ),
        ('agent = "workers.echo:Echo"\nsize = "two"', "pool 'echo', key 'size': Input should be a valid integer"),
        ('agent = "workers.echo:Echo"\nmax_overflw = 1', "pool 'echo', key 'max_overflw': unknown key"),
        (
            'agent = "workers.echo:Echo"\nworker_pool = "threads"\nstrategy = "random"',
            "pool 'echo', key 'strategy': Input should be 'lifo' or 'fifo'",
        ),
        (
            # Never accepted and ignored: a prefork node does not choose which process takes a call
            'agent = "workers.echo:Echo"\nstrategy = "fifo"',
            "pool 'echo', key 'strategy': Value error, applies where poolq hands out the agents",
        ),
        ("size = 1", "pool 'echo', key 'agent': required key is missing"),
        ('agent = "not a path"', "pool 'echo', key 'agent': String should match pattern"),
        ('agent = "workers.echo:Echo"\ntimeout = -1', "pool 'echo', key 'timeout': Input should be greater than 0"),
    ],
)
def test_a_bad_key_names_file_pool_and_key(tmp_path: Path, table: str, message: str) -> None:
    path = write(tmp_path, f"[pools.echo]\n{table}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(f"{path}, pool 'echo'") or str(caught.value).startswith(f"{path}: pool 'echo'")
    assert message in str(caught.value)


def test_not_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[pools.echo\nagent=")
    with pytest.raises(ConfigError, match=f"{path}: not valid TOML"):
        load_config(path, env={})


def test_missing_file_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such file.*POOLQ_CONFIG"):
        load_config(tmp_path / "missing.toml", env={})


def test_unknown_top_level_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key 'pool': unknown key"):
        load_config(write(tmp_path, '[pool.echo]\nagent = "a:B"\n'), env={})


def test_bad_pool_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pool 'Echo-1': a pool name is lowercase"):
        load_config(write(tmp_path, '[pools.Echo-1]\nagent = "a:B"\n'), env={})


def test_environment_overrides_a_pool_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={"POOLQ_ECHO__SIZE": "5", "POOLQ_THREADED__STRATEGY": "lifo"})
    assert config.pool("echo").size == 5
    assert config.pool("threaded").strategy == "lifo"


def test_bad_environment_override_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'size'.*\(from POOLQ_ECHO__SIZE='lots'\)"):
        load_config(write(tmp_path, GOOD), env={"POOLQ_ECHO__SIZE": "lots"})
    with pytest.raises(ConfigError, match="POOLQ_NOPE__SIZE: no pool named 'nope'"):
        load_config(write(tmp_path, GOOD), env={"POOLQ_NOPE__SIZE": "1"})


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert load_config(env={"POOLQ_CONFIG": str(path)}).path == path


def test_broker_url_from_environment_then_file_then_running_up(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    state_dir = tmp_path / ".poolq"
    env = {"POOLQ_STATE_DIR": str(state_dir)}
    with pytest.raises(BrokerNotConfigured, match="poolq up"):
        _ = load_config(path, env=env).broker_url
    state_dir.mkdir()
    (state_dir / "broker.url").write_text("redis://127.0.0.1:7777/0\n")
    assert load_config(path, env=env).broker_url == "redis://127.0.0.1:7777/0"
    env["POOLQ_BROKER_URL"] = "redis://elsewhere:6379/0"
    assert load_config(path, env=env).broker_url == "redis://elsewhere:6379/0"


def test_state_redis_defaults_to_a_redis_broker_and_is_required_otherwise(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert load_config(path, env={"POOLQ_BROKER_URL": "redis://h:1/2"}).state_url == "redis://h:1/2"
    amqp = load_config(path, env={"POOLQ_BROKER_URL": "amqp://guest:secret@h//"})
    with pytest.raises(ConfigError, match=r"amqp://guest:\*\*\*@h// is not Redis.*POOLQ_STATE_URL"):
        _ = amqp.state_url
    both = load_config(path, env={"POOLQ_BROKER_URL": "amqp://h//", "POOLQ_STATE_URL": "redis://s:1/0"})
    assert both.state_url == "redis://s:1/0"


def test_unknown_pool_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownPool, match=r"no pool named 'nope' in .* \(configured: echo, other, threaded\)"):
        load_config(write(tmp_path, GOOD), env={}).pool("nope")


def test_skipped_pools_get_no_maintenance_from_beat(tmp_path: Path) -> None:
    from poolq.app import celery_settings

    path = tmp_path / "pools.toml"
    path.write_text(GOOD)
    config = load_config(path, env={"POOLQ_BROKER_URL": "redis://127.0.0.1:6379/0", "POOLQ_SKIP_POOLS": "other"})
    assert config.skip_pools == {"other"}
    schedule = celery_settings(config)["beat_schedule"]
    assert {entry["args"] for entry in schedule.values()} == {("echo",), ("threaded",)}


def test_skipping_an_unknown_pool_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError, match="nosuch"):
        load_config(path, env={"POOLQ_BROKER_URL": "redis://127.0.0.1:6379/0", "POOLQ_SKIP_POOLS": "echo,nosuch"})


def test_observers_come_from_the_file_or_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(GOOD.replace("result_expires = 600", 'result_expires = 600\nobservers = ["a.b:C"]'))
    env = {"POOLQ_BROKER_URL": "redis://127.0.0.1:6379/0"}
    assert load_config(path, env=env).project.observers == ["a.b:C"]
    env["POOLQ_OBSERVERS"] = "x.y:Z, u.v:W"
    assert load_config(path, env=env).project.observers == ["x.y:Z", "u.v:W"]
