"""``@poolq.batched``: its arguments, its contract, and a batched operation called outside a batch."""

from __future__ import annotations

from typing import Any

import pytest

import poolq
from poolq.agent import BatchSpec, batch_results
from poolq.errors import ConfigError, InvalidArguments
from poolq.worker.batching import PREFETCH_BATCHES, prefetch_multiplier


class Doubler(poolq.Agent):
    @poolq.batched(max_size=4, max_wait=0.01)
    def double(self, items: list[Any]) -> list[Any]:
        return [ValueError("odd one") if item == "bad" else item * 2 for item in items]

    @poolq.batched
    def plain(self, items: list[int]) -> list[int]:
        return items

    @poolq.operation
    def single(self, x: int) -> int:
        return x


def test_the_agent_lists_its_batched_operations_with_their_settings() -> None:
    assert Doubler.batched_operations() == {"double": BatchSpec(4, 0.01), "plain": BatchSpec(32, 0.005)}
    assert {"double", "plain", "single", "handle"} <= set(Doubler.operations())
    assert prefetch_multiplier(Doubler, 1) == PREFETCH_BATCHES * 32  # the largest max_size
    assert prefetch_multiplier(poolq.Agent, 1) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_size": 0}, "max_size must be an integer >= 1"),
        ({"max_size": 2.5}, "max_size must be an integer >= 1"),
        ({"max_size": True}, "max_size must be an integer >= 1"),
        ({"max_wait": -0.1}, "max_wait must be >= 0"),
        ({"max_wait": float("inf")}, "max_wait must be a finite number"),
        ({"max_wait": "5ms"}, "max_wait must be a finite number"),
    ],
)
def test_invalid_decorator_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        poolq.batched(**kwargs)


def test_a_batched_method_takes_exactly_one_list() -> None:
    with pytest.raises(ConfigError, match="exactly one argument besides self"):

        class Wrong(poolq.Agent):
            @poolq.batched(max_size=2)
            def pair(self, a: list[int], b: list[int]) -> list[int]:
                return a + b


def test_outside_a_batch_a_call_runs_as_a_batch_of_one() -> None:
    agent = Doubler()
    assert agent.bind("double", [21], {})() == 42
    with pytest.raises(ValueError, match="odd one"):
        agent.bind("double", ["bad"], {})()
    with pytest.raises(InvalidArguments, match="exactly one positional argument"):
        agent.bind("double", [1, 2], {})
    with pytest.raises(InvalidArguments, match="exactly one positional argument"):
        agent.bind("double", [], {"items": [1]})


def test_results_must_match_the_items() -> None:
    assert batch_results("op", (1, 2), 2) == [1, 2]
    with pytest.raises(TypeError, match="returned 3 results for 2 items"):
        batch_results("op", [1, 2, 3], 2)
    with pytest.raises(TypeError, match="must return a list, not dict"):
        batch_results("op", {"a": 1}, 1)


# -- the node's buffers (poolq.worker.batching.Batcher), driven without a broker --


class FakeMessage:
    def __init__(self, n: int, op: str = "double", redelivered: bool = False) -> None:
        self.headers = {"id": f"t{n}", "poolq_op": op}
        self.delivery_info = {"redelivered": redelivered}
        self.acknowledged = False
        self.settled = ""

    def decode(self) -> Any:
        return [[n_of(self)], {}, {}]

    def ack_log_error(self, logger: Any, errors: Any) -> None:
        self.acknowledged, self.settled = True, "ack"

    def reject_log_error(self, logger: Any, errors: Any, requeue: bool = False) -> None:
        self.acknowledged, self.settled = True, "requeue" if requeue else "reject"


def n_of(message: FakeMessage) -> int:
    return int(message.headers["id"][1:])


class FakePool:
    num_processes = 1

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []

    def apply_async(self, target: Any, args: Any, **callbacks: Any) -> None:
        self.jobs.append({"args": args, **callbacks})


class FakeTimer:
    def __init__(self) -> None:
        self.scheduled: list[float] = []

    def call_after(self, seconds: float, fn: Any, *args: Any) -> None:
        self.scheduled.append(seconds)


def batcher(pool: FakePool) -> Any:
    from poolq.worker.batching import Batcher

    return Batcher({"double": BatchSpec(max_size=3, max_wait=10.0)}, pool, FakeTimer())


def test_a_full_buffer_goes_out_at_once_and_its_messages_are_acked_after_the_batch() -> None:
    pool = FakePool()
    buffers = batcher(pool)
    messages = [FakeMessage(n) for n in range(3)]
    # Given calls arriving one by one: nothing goes out before max_size (max_wait is 10 s)
    buffers.add(messages[0])
    buffers.add(messages[1])
    assert pool.jobs == [] and buffers.timer.scheduled == [10.0]
    # When the third arrives, the batch goes to a process as one job
    buffers.add(messages[2])
    [job] = pool.jobs
    op, items = job["args"]
    assert op == "double" and [i["args"] for i in items] == [[0], [1], [2]]
    assert not any(m.acknowledged for m in messages)  # acks late
    # Then the messages are settled as the process says, when it returns
    job["callback"](["ack", "requeue", "ack"])
    assert [m.settled for m in messages] == ["ack", "requeue", "ack"]


def test_batches_wait_for_a_free_process_and_a_lost_process_requeues_its_batch() -> None:
    from billiard.exceptions import WorkerLostError

    pool = FakePool()
    buffers = batcher(pool)
    first = [FakeMessage(n) for n in range(3)]
    second = [FakeMessage(n) for n in range(3, 7)]
    for message in [*first, *second]:
        buffers.add(message)
    # One process: one batch in flight; the other waits, and grows no larger than max_size
    assert len(pool.jobs) == 1
    # When the process running the first batch dies, its calls go back to the queue
    pool.jobs[0]["error_callback"](WorkerLostError("killed"))
    assert [m.settled for m in first] == ["requeue"] * 3
    # And the next batch (max_size of the waiting calls) goes out
    assert [i["args"] for i in pool.jobs[1]["args"][1]] == [[3], [4], [5]]


def test_a_redelivered_call_runs_in_a_batch_of_its_own() -> None:
    pool = FakePool()
    buffers = batcher(pool)
    buffers.add(FakeMessage(1))
    buffers.add(FakeMessage(2, redelivered=True))
    [job] = pool.jobs
    assert [i["id"] for i in job["args"][1]] == ["t2"]
    assert not buffers.takes(FakeMessage(3, op="single"))
