"""The CLI's argument handling, in process (the real command runs in test_up and test_cli_process)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from poolq import Completed, InvalidArguments
from poolq.cli import _parse_payload, main
from poolq.testing import render_config


def test_payload_object_is_keyword_arguments() -> None:
    assert _parse_payload('{"text": "hi"}') == ([], {"text": "hi"})


def test_payload_array_is_positional_arguments() -> None:
    assert _parse_payload("[1, 2]") == ([1, 2], {})


@pytest.mark.parametrize("payload", ["{not json", "42", '"text"'])
def test_bad_payload_is_a_usage_error(payload: str, tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(render_config("p", {"agent": "a:B"}))
    result = CliRunner().invoke(main, ["call", "p", payload, "--config", str(path)])
    assert result.exit_code == 2
    assert "PAYLOAD" in result.output


def test_unknown_pool_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(render_config("p", {"agent": "a:B"}))
    result = CliRunner().invoke(main, ["call", "nope", "{}", "--config", str(path)])
    assert result.exit_code == 1
    assert "UnknownPool: no pool named 'nope'" in result.output


def test_config_error_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text("[pools.p]\nsize = 0\n")
    result = CliRunner().invoke(main, ["pools", "--config", str(path)])
    assert result.exit_code == 1
    assert f"ConfigError: {path}, pool 'p', key 'agent': required key is missing" in result.output


def test_pools_lists_the_configuration() -> None:
    root = Path(__file__).resolve().parents[2]
    result = CliRunner().invoke(main, ["pools", "--config", str(root / "config" / "pools.toml")])
    assert result.exit_code == 0
    assert "echo: workers.echo:Echo size=2" in result.output


def test_map_unordered_prints_each_result_with_its_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(render_config("p", {"agent": "a:B"}))
    asked: list[dict[str, Any]] = []

    class Arrivals:
        def __init__(self, config: Any) -> None:
            pass

        def map(self, pool: str, items: list[Any], **options: Any) -> Iterator[Completed]:
            asked.append({"items": len(items), **options})
            yield Completed(1, {"n": 2})
            yield Completed(0, InvalidArguments("missing x"))

    monkeypatch.setattr("poolq.cli.calls.Client", Arrivals)
    result = CliRunner().invoke(main, ["map", "p", "-", "--unordered", "--config", str(path)], input="[1]\n[2]\n")
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"index": 1, "result": {"n": 2}},
        {"index": 0, "error": "InvalidArguments: missing x"},
    ]
    assert asked[0]["items"] == 2 and asked[0]["ordered"] is False and asked[0]["return_exceptions"] is True
