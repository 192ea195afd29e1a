"""Issue 14.5: ``map(ordered=False)`` yields each result as its call completes, with its input's index.

The calls run on real agents (``tests.agents:Probe``); ``work(marker, sleep)``
records each finished call under ``test:unord:done``, which tells whether the
slowest call was still running when the first result came.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from poolq import Arguments, AsyncClient, Completed, InvalidArguments
from poolq.local.procs import child_preexec, stop_process
from poolq.testing import PoolFactory, RunningPool

POOL = "unord"
DONE = f"test:{POOL}:done"
#: Four calls on four agents, all at once: they finish in the order 1, 3, 2, 0.
SLEEPS = [2.0, 0.1, 1.0, 0.5]
#: Seconds the ``poolq map`` command may take to print all its lines and end.
COMMAND_WAIT = 60.0


def _work(marker: str, sleep: float) -> Arguments:
    return Arguments([], {"marker": marker, "sleep": sleep})


def _staggered(prefix: str) -> list[Arguments]:
    return [_work(f"{prefix}{i}", sleep) for i, sleep in enumerate(SLEEPS)]


def _no_new_threads(before: set[int | None], timeout: float = 5.0) -> None:
    """Wait (bounded) until every thread started since ``before`` has ended."""
    deadline = time.monotonic() + timeout
    while (new := [t.name for t in threading.enumerate() if t.ident not in before]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not new, f"threads left running: {new}"


@pytest.fixture(scope="module")
def pool(module_pools: PoolFactory, poolq_broker: str) -> Iterator[RunningPool]:
    running = module_pools.start(POOL, "tests.agents:Probe", size=4, options={"redis_url": poolq_broker})
    running.client.map(POOL, ["warm"] * 4)  # the client's own connections and threads, made once
    yield running


@pytest.fixture
def quiet(pool: RunningPool, state: redis.Redis) -> Iterator[RunningPool]:
    """The pool idle, its records of finished calls empty; left idle for the next test."""
    pool.client.wait_quiet(POOL, timeout=30)
    state.delete(DONE)
    yield pool
    pool.client.wait_quiet(POOL, timeout=30)


def test_results_come_as_their_calls_complete_each_with_its_index(quiet: RunningPool, state: redis.Redis) -> None:
    # Given four calls whose durations do not follow their order
    items = _staggered("c")
    started = time.monotonic()
    arrivals: list[tuple[int, float]] = []
    done_at_first: list[str] | None = None

    # When they are mapped unordered
    for completed in quiet.client.map(POOL, items, op="work", concurrency=4, ordered=False):
        arrivals.append((completed.index, time.monotonic() - started))
        if done_at_first is None:
            done_at_first = state.lrange(DONE, 0, -1)
        index, result = completed  # a pair
        assert result["marker"] == f"c{index}"

    # Then each comes as its call finishes, each index once
    order = [index for index, _ in arrivals]
    assert order == [1, 3, 2, 0]
    assert done_at_first is not None and "c0" not in done_at_first  # the slowest still ran
    assert arrivals[0][1] < arrivals[-1][1] - 1.0
    print(f"\narrivals (index, s): {[(i, round(t, 2)) for i, t in arrivals]}")


def test_inputs_are_read_lazily_and_at_most_concurrency_calls_are_out(quiet: RunningPool) -> None:
    taken: list[int] = []

    def inputs() -> Iterator[Arguments]:
        for i in range(10):
            taken.append(i)
            yield _work(f"l{i}", 0.05)

    stream = quiet.client.map(POOL, inputs(), op="work", concurrency=2, ordered=False)
    assert taken == []  # nothing happens before the first next()
    first = next(stream)
    assert len(taken) == 2  # the next input is read when a result is taken
    rest = list(stream)
    assert sorted(index for index, _ in [first, *rest]) == list(range(10))
    assert all(isinstance(c, Completed) and c.result["marker"] == f"l{c.index}" for c in [first, *rest])


def test_return_exceptions_yields_the_error_in_place_of_the_result(quiet: RunningPool) -> None:
    items = [_work("e0", 0.2), Arguments([], {"nope": 1}), _work("e2", 0.0)]
    got = dict(quiet.client.map(POOL, items, op="work", ordered=False, return_exceptions=True))
    assert set(got) == {0, 1, 2}
    assert isinstance(got[1], InvalidArguments)
    assert got[0]["marker"] == "e0" and got[2]["marker"] == "e2"


def test_the_first_failure_raises_and_stops_waiting_for_the_rest(quiet: RunningPool) -> None:
    before = {t.ident for t in threading.enumerate()}
    items = [_work("f0", 3.0), Arguments([], {"nope": 1}), _work("f2", 3.0)]
    started = time.monotonic()
    with pytest.raises(InvalidArguments):
        for _ in quiet.client.map(POOL, items, op="work", ordered=False):
            pass
    assert time.monotonic() - started < 2.5  # not after the 3 s calls
    _no_new_threads(before)


def test_leaving_early_ends_the_thread_and_the_waits(quiet: RunningPool, state: redis.Redis) -> None:
    # Given a map whose first call is quick and the others slow
    before = {t.ident for t in threading.enumerate()}
    items = [_work("b0", 0.0), *(_work(f"b{i}", 3.0) for i in range(1, 4))]
    started = time.monotonic()

    # When the caller breaks out after the first result
    for index, _ in quiet.client.map(POOL, items, op="work", concurrency=4, ordered=False):
        assert index == 0
        break
    left_after = time.monotonic() - started

    # Then it is back at once, and the map's threads end
    assert left_after < 2.5
    _no_new_threads(before)
    assert "b1" not in state.lrange(DONE, 0, -1)  # they were left running, not waited for
    print(f"\nleft after {left_after:.2f}s with 3 calls of 3 s in flight")


def test_async_map_unordered(quiet: RunningPool) -> None:
    async def main() -> tuple[list[int], int, list[asyncio.Task[Any]]]:
        aclient = AsyncClient(quiet.client)
        try:
            order = [index async for index, _ in aclient.map(POOL, _staggered("a"), op="work", ordered=False)]
            async with contextlib.aclosing(aclient.map(POOL, _staggered("x"), op="work", ordered=False)) as stream:
                first, _ = await anext(stream)  # and leave with the others in flight
        finally:
            await aclient.aclose()
        await asyncio.sleep(0)
        return order, first, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    order, first, leftover = asyncio.run(main())
    assert order == [1, 3, 2, 0] and first == 1
    assert leftover == []  # no call left waiting once the map is closed


def _next_line(output: queue.Queue[str | None], deadline: float, stderr: Path) -> str | None:
    """The command's next line of output (None: its output ended); fail once ``deadline`` (monotonic) passed."""
    try:
        return output.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise AssertionError(f"poolq map printed no line in time; its stderr:\n{stderr.read_text()}") from None


def test_map_command_unordered_prints_each_result_as_it_arrives(
    quiet: RunningPool, module_pools: PoolFactory, state: redis.Redis, tmp_path: Path
) -> None:
    lines = [json.dumps(item.kwargs) for item in _staggered("p")] + ['{"nope": 1}']
    command = [sys.executable, "-m", "poolq", "map", POOL, "-", "--op", "work", "--unordered", "--concurrency", "5"]
    stderr_path = tmp_path / "map.stderr"
    output: queue.Queue[str | None] = queue.Queue()
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, env=module_pools.environment(quiet), text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
            start_new_session=True, preexec_fn=child_preexec,
        )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    stdin, stdout = process.stdin, process.stdout

    def read() -> None:  # a thread of its own, so that no read waits past the deadline
        for line in stdout:
            output.put(line)
        output.put(None)

    reader = threading.Thread(target=read, name="poolq-map-stdout", daemon=True)
    reader.start()
    deadline = time.monotonic() + COMMAND_WAIT
    try:
        stdin.write("\n".join(lines))
        stdin.close()
        line = _next_line(output, deadline, stderr_path)
        assert line is not None, stderr_path.read_text()
        first = json.loads(line)
        # The first line is out while the slowest call still runs
        assert "p0" not in state.lrange(DONE, 0, -1) and process.poll() is None
        rest = []
        while (line := _next_line(output, deadline, stderr_path)) is not None:
            rest.append(json.loads(line))
        assert process.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, stderr_path.read_text()
    finally:
        stop_process(process, timeout=5)  # by pid: SIGTERM, SIGKILL after 5 s; at once gone when it ended
        with contextlib.suppress(OSError):
            stdin.close()
        reader.join(10)  # the pipe closed with the process
        if not reader.is_alive():
            stdout.close()
    printed = [first, *rest]
    assert sorted(line["index"] for line in printed) == [0, 1, 2, 3, 4]
    assert [line["index"] for line in printed if "result" in line] == [1, 3, 2, 0]
    assert all(line["result"]["marker"] == f"p{line['index']}" for line in printed if "result" in line)
    [error] = [line for line in printed if "error" in line]
    assert error["index"] == 4 and error["error"].startswith("InvalidArguments")
