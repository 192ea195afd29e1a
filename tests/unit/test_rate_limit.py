"""F25: a pool's rate_limit is read and checked at load, and block=False looks before sending (no broker needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import poolq
from poolq import ConfigError, PoolExhausted, RateLimited, load_config
from poolq.client import core
from poolq.config import RateLimit
from poolq.store import messages, ratelimit
from poolq.testing import render_config

EXPECTED = "expected '<n>/s', '<n>/m' or '<n>/h'"


def write(tmp_path: Path, **keys: Any) -> Path:
    path = tmp_path / "pools.toml"
    path.write_text(render_config("echo", {"agent": "workers.echo:Echo", **keys}))
    return path


@pytest.mark.parametrize(
    ("text", "calls", "per"),
    [("20/s", 20, 1.0), ("100/m", 100, 60.0), ("1/h", 1, 3600.0), (" 5 / m ", 5, 60.0), ("1000000/s", 10**6, 1.0)],
)
def test_a_rate_limit_is_calls_per_second_minute_or_hour(tmp_path: Path, text: str, calls: int, per: float) -> None:
    pool = load_config(write(tmp_path, rate_limit=text), env={}).pool("echo")
    assert pool.rate == RateLimit(calls, per)
    assert str(pool.rate) == text.replace(" ", "")


def test_no_rate_limit_by_default(tmp_path: Path) -> None:
    pool = load_config(write(tmp_path), env={}).pool("echo")
    assert pool.rate_limit is None and pool.rate is None


@pytest.mark.parametrize("bad", ["20", "20/x", "20/sec", "0/s", "-1/s", "1.5/s", "/s", "", "20/s/s", 20, 1.5, True])
def test_a_bad_rate_limit_is_a_config_error_naming_file_pool_and_key(tmp_path: Path, bad: object) -> None:
    path = write(tmp_path, rate_limit=bad)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(f"{path}, pool 'echo', key 'rate_limit': ")
    assert EXPECTED in str(caught.value)


def test_the_environment_sets_or_breaks_a_rate_limit(tmp_path: Path) -> None:
    path = write(tmp_path, rate_limit="20/s")
    assert load_config(path, env={"POOLQ_ECHO__RATE_LIMIT": "3/m"}).pool("echo").rate == RateLimit(3, 60.0)
    with pytest.raises(ConfigError, match=r"key 'rate_limit'.*expected .*\(from POOLQ_ECHO__RATE_LIMIT='fast'\)"):
        load_config(path, env={"POOLQ_ECHO__RATE_LIMIT": "fast"})


def test_the_window_is_a_little_wider_than_the_limit_says() -> None:
    # Grants are counted on the server; the operation starts a moment later in the worker
    assert ratelimit.window(RateLimit(10, 1.0)) == pytest.approx(1.0 + ratelimit.GUARD)
    assert 0 < ratelimit.GUARD <= 0.1


def test_rate_limited_is_a_pool_exhausted_with_a_kind_of_its_own() -> None:
    assert issubclass(RateLimited, PoolExhausted) and "RateLimited" in poolq.__all__
    assert RateLimited.kind == "rate_limited" and poolq.PoolqError.by_kind()["rate_limited"] is RateLimited
    with pytest.raises(RateLimited, match="no slot"):
        messages.decode_reply(messages.encode_error("t1", RateLimited("no slot"), ""))


def _spec(tmp_path: Path, block: bool, **keys: Any) -> core.CallSpec:
    config = load_config(write(tmp_path, **keys), env={})
    return core.admit(config, "echo", ("hi",), {"block": block})


def _drive(steps: core.Steps[None], wait: float) -> list[core.Effect]:
    asked: list[core.Effect] = []

    def perform(effect: core.Effect) -> Any:
        asked.append(effect)
        return wait

    core.run(steps, perform)
    return asked


def test_block_false_looks_at_the_window_and_is_refused_when_it_is_full(tmp_path: Path) -> None:
    spec = _spec(tmp_path, block=False, rate_limit="20/s")
    # Given a full window, when a call that may not wait looks: RateLimited, saying when a slot frees
    with pytest.raises(RateLimited, match=r"pool 'echo' is at its rate_limit \(20/s\); a slot frees in 0.25s"):
        _drive(core.refuse_if_rate_limited(spec), wait=0.25)
    # Given a free slot: it goes on, having only looked (the worker takes the slot)
    assert _drive(core.refuse_if_rate_limited(spec), wait=0.0) == [core.PeekRate("echo", RateLimit(20, 1.0))]


@pytest.mark.parametrize(("block", "keys"), [(True, {"rate_limit": "20/s"}), (False, {})])
def test_a_call_that_may_wait_or_an_unlimited_pool_does_not_look(
    tmp_path: Path, block: bool, keys: dict[str, Any]
) -> None:
    assert _drive(core.refuse_if_rate_limited(_spec(tmp_path, block=block, **keys)), wait=1.0) == []
