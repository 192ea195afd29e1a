"""F2: the agent base class, its operations and argument checks (pure logic)."""

from __future__ import annotations

from typing import Any

import pytest

import poolq
from poolq import InvalidArguments, UnknownOperation


class Calculator(poolq.Agent):
    def handle(self, a: int, b: int = 1) -> int:
        return a + b

    @poolq.operation
    def times(self, a: int, b: int) -> int:
        return a * b

    @poolq.operation
    def broken(self) -> Any:
        return len(1)  # type: ignore[arg-type]

    def helper(self) -> str:  # not an operation
        return "internal"


class Scientific(Calculator):
    @poolq.operation
    def power(self, a: int, b: int) -> int:
        return int(a**b)


def test_hooks_do_nothing_by_default() -> None:
    agent = poolq.Agent({"k": "v"}, pool="p", name="n")
    assert agent.setup() is None and agent.reset() is None and agent.teardown() is None
    assert agent.healthy() is True
    assert (agent.options, agent.pool, agent.name) == ({"k": "v"}, "p", "n")
    with pytest.raises(NotImplementedError):
        agent.handle()


def test_operations_are_handle_and_marked_methods_including_inherited() -> None:
    assert set(Calculator.operations()) == {"handle", "times", "broken"}
    assert set(Scientific.operations()) == {"handle", "times", "broken", "power"}


def test_bind_runs_the_named_operation() -> None:
    agent = Scientific()
    assert agent.bind(None, [2], {})() == 3
    assert agent.bind("handle", [2], {"b": 5})() == 7
    assert agent.bind("power", [2, 10], {})() == 1024


def test_unknown_operation_and_plain_methods_are_refused() -> None:
    with pytest.raises(UnknownOperation, match=r"no operation 'helper'.*known: broken, handle, times"):
        Calculator().bind("helper", [], {})


@pytest.mark.parametrize(
    ("op", "args", "kwargs"), [(None, [], {}), (None, [1, 2, 3], {}), ("times", [1], {}), (None, [1], {"c": 2})]
)
def test_arguments_are_checked_before_running(op: str | None, args: list[Any], kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArguments):
        Calculator().bind(op, args, kwargs)


def test_a_type_error_inside_the_operation_is_not_a_bad_call() -> None:
    call = Calculator().bind("broken", [], {})
    with pytest.raises(TypeError):
        call()
