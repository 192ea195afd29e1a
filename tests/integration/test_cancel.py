"""Issue 14.2: cancelling a call.

``Handle.revoke()``, or cancelling the task that awaits an ``acall``, withdraws
a queued call (it never runs) and asks a running one to stop: an agent that
polls ``self.cancelled()`` returns early and serves on, warm. A cancel and the
call's own claim and finish are each one script on the call's claim, so
whichever comes first decides, and a call cancelled while it ran never
reports success.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from poolq import AsyncClient, CallCancelled, Handle
from poolq.client.waiting import CallWait
from poolq.store import connection, keys, messages, protocol
from poolq.testing import PoolFactory, RunningPool
from tests.agents import clear, done, events, ran
from tests.observers import read

POOL = "cancel"
#: Bound on every wait of this module (seconds).
WAIT = 15.0


@pytest.fixture(scope="module")
def events_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cancel") / "events.jsonl"


@pytest.fixture(scope="module")
def single(module_pools: PoolFactory, poolq_broker: str, events_path: Path) -> Iterator[RunningPool]:
    """One agent, so one long call holds every later call in the queue; its events go to ``events_path``."""
    env = {"POOLQ_OBSERVERS": "tests.observers:FileObserver", "POOLQ_TEST_EVENTS": str(events_path)}
    yield module_pools.start(POOL, "tests.agents:Probe", size=1, env=env, options={"redis_url": poolq_broker})


@pytest.fixture
def idle(single: RunningPool, state: redis.Redis) -> RunningPool:
    """The pool with nothing queued or running, and the agent's records cleared."""
    single.client.wait_quiet(POOL, timeout=WAIT)
    clear(state, POOL)
    return single


def stopped(state: redis.Redis) -> list[str]:
    """The markers of ``patient`` calls that saw their cancel and returned early."""
    return list(state.lrange(f"test:{POOL}:stopped", 0, -1))


def jam(pool: RunningPool, state: redis.Redis, seconds: float) -> Handle:
    """Keep the only agent busy for ``seconds`` (a ``work`` call marked ``jam``), once it has started."""
    handle = pool.client.cast(POOL, "jam", op="work", sleep=seconds)
    pool.wait_for(lambda: ran(state, POOL) == ["jam"], timeout=WAIT, what="the jam started")
    return handle


def requests(state: redis.Redis) -> int:
    return int(state.hget(keys.stats(POOL), "requests") or 0)


def call_events(path: Path, hook: str, task_id: str) -> list[dict[str, Any]]:
    return [e for e in read(path, hook) if e["task_id"] == task_id]


def one_event(pool: RunningPool, path: Path, hook: str, task_id: str) -> dict[str, Any]:
    """The one ``hook`` event of call ``task_id`` (the worker writes it right after the reply)."""
    pool.wait_for(lambda: bool(call_events(path, hook, task_id)), timeout=WAIT, what=f"{hook} of {task_id}")
    (event,) = call_events(path, hook, task_id)
    return event


def cancelled_events(path: Path, ran_: bool) -> list[dict[str, Any]]:
    return [e for e in read(path, "call_failed") if e["kind"] == "cancelled" and e["ran"] is ran_]


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT}s: {what}"
        await asyncio.sleep(0.01)


# -- a queued call ------------------------------------------------------------


def test_revoking_a_queued_call_withdraws_it(idle: RunningPool, state: redis.Redis, events_path: Path) -> None:
    # Given the only agent is busy, and a call waits behind it (long enough to run after it)
    before = requests(state)
    busy = jam(idle, state, 2.0)
    queued = idle.client.cast(POOL, "queued", op="work", timeout=60)

    # When it is revoked
    assert queued.revoke() == "withdrawn"

    # Then its result is CallCancelled at once, and stays so
    started = time.monotonic()
    with pytest.raises(CallCancelled, match="did not run"):
        queued.result(timeout=WAIT)
    assert time.monotonic() - started < 0.5
    assert queued.state == "FAILURE"
    assert queued.revoke() == "withdrawn"  # again: the same answer, nothing changes
    with pytest.raises(CallCancelled):
        Handle(queued.id, client=idle.client).result(timeout=WAIT)  # from anywhere, by id

    # And it never runs: the next call after the jam runs right after it
    assert busy.result(timeout=WAIT)["marker"] == "jam"
    assert idle.client.call(POOL, "after", op="work")["marker"] == "after"
    assert ran(state, POOL) == ["jam", "after"]
    # The worker that found it dropped it: not a request, no start, one "cancelled" failure
    assert requests(state) - before == 2
    assert call_events(events_path, "call_started", queued.id) == []
    failed = one_event(idle, events_path, "call_failed", queued.id)
    assert failed["kind"] == "cancelled" and failed["error_type"] == "CallCancelled" and not failed["ran"]


def test_cancelling_a_queued_acall_withdraws_it(idle: RunningPool, state: redis.Redis, events_path: Path) -> None:
    # Given the only agent is busy
    busy = jam(idle, state, 3.0)
    queue = idle.config.pool(POOL).queue
    withdrawn_before = len(cancelled_events(events_path, ran_=False))

    async def main() -> tuple[float, float]:
        aclient = AsyncClient(idle.client)
        try:
            # When the task awaiting a queued acall is cancelled (a web client went away)
            task = asyncio.create_task(aclient.call(POOL, "by-cancel", op="work", timeout=60))
            await until(lambda: state.llen(queue) == 1, "the call is queued")
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            cancelled_after = time.monotonic() - started

            # ... or its wait_for runs out
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(aclient.call(POOL, "by-timeout", op="work", timeout=60), 0.5)
            timed_out_after = time.monotonic() - started
            return cancelled_after, timed_out_after
        finally:
            await aclient.aclose()

    cancelled_after, timed_out_after = asyncio.run(main())

    # Then the cancel goes on at once (the withdraw is one round trip) ...
    assert cancelled_after < 0.5 and timed_out_after < 1.0
    # ... and neither call ever runs: the next call after the jam runs right after it
    assert busy.result(timeout=WAIT)["marker"] == "jam"
    assert idle.client.call(POOL, "after", op="work")["marker"] == "after"
    assert ran(state, POOL) == ["jam", "after"]
    idle.wait_for(
        lambda: len(cancelled_events(events_path, ran_=False)) == withdrawn_before + 2, timeout=WAIT, what="events"
    )


def test_ctrl_c_in_a_sync_call_withdraws_it(
    idle: RunningPool, module_pools: PoolFactory, state: redis.Redis, tmp_path: Path, events_path: Path
) -> None:
    # Given the only agent is busy, and a process waits in poolq.call() on a queued call
    busy = jam(idle, state, 3.0)
    withdrawn_before = len(cancelled_events(events_path, ran_=False))
    queue = idle.config.pool(POOL).queue
    script = f"import poolq; poolq.call({POOL!r}, 'ctrl-c', op='work', timeout=60)"
    log = (tmp_path / "caller.log").open("wb")
    caller = subprocess.Popen(
        [sys.executable, "-c", script], env=module_pools.environment(idle), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        idle.wait_for(lambda: state.llen(queue) == 1, timeout=WAIT, what="the call is queued")
        # When it gets Ctrl-C
        caller.send_signal(signal.SIGINT)
        assert caller.wait(timeout=WAIT) != 0
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(timeout=WAIT)
        log.close()
    assert "KeyboardInterrupt" in (tmp_path / "caller.log").read_text()

    # Then the call never runs
    assert busy.result(timeout=WAIT)["marker"] == "jam"
    assert idle.client.call(POOL, "after", op="work")["marker"] == "after"
    assert ran(state, POOL) == ["jam", "after"]
    idle.wait_for(
        lambda: len(cancelled_events(events_path, ran_=False)) == withdrawn_before + 1, timeout=WAIT, what="its event"
    )


# -- a running call -----------------------------------------------------------


def test_revoking_a_running_call_stops_an_agent_that_polls(
    idle: RunningPool, state: redis.Redis, events_path: Path
) -> None:
    # Given a warm agent runs a long call that polls self.cancelled()
    agent = idle.client.call(POOL, "warm", op="work")
    handle = idle.client.cast(POOL, "long", op="patient", seconds=30)
    idle.wait_for(lambda: "long" in ran(state, POOL), timeout=WAIT, what="the long call started")

    # When it is revoked
    started = time.monotonic()
    assert handle.revoke() == "interrupting"

    # Then the call returns early, and its caller hears CallCancelled
    with pytest.raises(CallCancelled, match="while it ran"):
        handle.result(timeout=WAIT)
    assert time.monotonic() - started < 2.0
    assert stopped(state) == ["long"] and done(state, POOL) == ["warm"]
    assert handle.revoke() == "finished"

    # And the same agent serves the next call, warm (no teardown, no setup)
    assert idle.client.call(POOL, "next", op="work")["pid"] == agent["pid"]
    assert events(state, POOL) == []
    failed = one_event(idle, events_path, "call_failed", handle.id)
    assert failed["kind"] == "cancelled" and failed["ran"]
    assert call_events(events_path, "call_succeeded", handle.id) == []


def test_cancelling_a_running_acall_stops_an_agent_that_polls(idle: RunningPool, state: redis.Redis) -> None:
    async def main() -> None:
        aclient = AsyncClient(idle.client)
        try:
            task = asyncio.create_task(aclient.call(POOL, "arun", op="patient", seconds=30))
            await until(lambda: ran(state, POOL) == ["arun"], "the call started")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await aclient.aclose()

    started = time.monotonic()
    asyncio.run(main())
    idle.wait_for(lambda: stopped(state) == ["arun"], timeout=WAIT, what="the agent stopped")
    assert time.monotonic() - started < 5.0
    assert idle.client.call(POOL, "next", op="work")["marker"] == "next"


def test_a_call_cancelled_while_it_ran_never_reports_success(
    idle: RunningPool, state: redis.Redis, events_path: Path
) -> None:
    # Given a running call whose agent never looks at cancelled()
    handle = idle.client.cast(POOL, "deaf", op="work", sleep=1.0)
    idle.wait_for(lambda: ran(state, POOL) == ["deaf"], timeout=WAIT, what="the call started")

    # When it is revoked, it runs to its end
    assert handle.revoke() == "interrupting"
    with pytest.raises(CallCancelled):
        handle.result(timeout=WAIT)
    assert done(state, POOL) == ["deaf"]
    # But its result was dropped: its caller, the stored result and the events say cancelled
    assert handle.state == "FAILURE"
    failed = one_event(idle, events_path, "call_failed", handle.id)
    assert failed["kind"] == "cancelled" and failed["ran"]


def test_revoking_a_finished_call_changes_nothing(idle: RunningPool) -> None:
    handle = idle.client.cast(POOL, "quick", op="work")
    assert handle.result(timeout=WAIT)["marker"] == "quick"
    assert handle.revoke() == "finished"
    assert handle.result(timeout=WAIT)["marker"] == "quick"
    assert handle.state == "SUCCESS"


# -- the race, one script against another ---------------------------------------


@pytest.fixture
def scripts(state: redis.Redis) -> Iterator[connection.Scripts]:
    scripts = connection.Scripts(state)
    yield scripts
    scripts.close()


def _finish(scripts: connection.Scripts, task_id: str, result: Any) -> bool:
    reply = messages.encode_result(task_id, result)
    return protocol.finish(scripts, task_id, reply, keys.reply(task_id), "", keys.stats("cancel-race"), 0, True, 0.0)


def _reply(state: redis.Redis, task_id: str) -> Any:
    popped = state.blpop([keys.reply(task_id)], timeout=1)
    assert popped is not None
    return messages.decode_reply(popped[1])


def test_race_a_cancel_before_any_agent_wins(scripts: connection.Scripts, state: redis.Redis) -> None:
    task_id = str(uuid.uuid4())
    assert protocol.cancel(scripts, task_id, reply_to=keys.reply(task_id)) == "withdrawn"
    # An agent that finds it later does not get it, nor does a caller's give-up change it
    claim = protocol.claim(scripts, task_id, "agent-1", "agent-1", time.time())
    assert not claim.run and claim.owner == protocol.CANCELLED
    assert protocol.give_up(scripts, task_id)[0] == protocol.CANCELLED
    with pytest.raises(CallCancelled):
        _reply(state, task_id)


def test_race_a_claim_before_the_cancel_makes_it_interrupting(scripts: connection.Scripts, state: redis.Redis) -> None:
    task_id = str(uuid.uuid4())
    assert protocol.claim(scripts, task_id, "agent-1", "agent-1", time.time()).run
    assert not protocol.cancel_requested(scripts, task_id)
    assert protocol.cancel(scripts, task_id) == "interrupting"
    assert protocol.cancel_requested(scripts, task_id)
    # The agent's result, sent after the cancel, is replaced: CallCancelled, never success
    assert _finish(scripts, task_id, "result") is True
    with pytest.raises(CallCancelled):
        _reply(state, task_id)
    assert protocol.cancel(scripts, task_id) == "finished"


def test_race_a_finish_before_the_cancel_keeps_its_result(scripts: connection.Scripts, state: redis.Redis) -> None:
    task_id = str(uuid.uuid4())
    assert protocol.claim(scripts, task_id, "agent-1", "agent-1", time.time()).run
    assert _finish(scripts, task_id, "result") is False
    assert protocol.cancel(scripts, task_id, reply_to=keys.reply(task_id)) == "finished"
    assert _reply(state, task_id) == "result"
    assert state.llen(keys.reply(task_id)) == 0  # the cancel pushed nothing


def test_race_an_expired_call_is_finished(scripts: connection.Scripts) -> None:
    task_id = str(uuid.uuid4())
    assert protocol.give_up(scripts, task_id) == ("", 0)  # the caller's CheckoutTimeout won
    assert protocol.cancel(scripts, task_id) == "finished"


def test_a_caller_that_finds_its_call_withdrawn_hears_call_cancelled() -> None:
    # A sync call revoked by id elsewhere (its reply went to its list, but the caller looks at the claim too)
    wait = CallWait(pool=POOL, timeout=1.0, call_timeout=1.0, max_deliveries=1, redelivery=1.0, started=0.0)
    with pytest.raises(CallCancelled):
        wait.next_deadline(1.0, protocol.ClaimView(protocol.CANCELLED))
