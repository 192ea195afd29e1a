"""Flower shows a poolq deployment: its queues' depth, its workers, and each call's operation and agent.

A real pool and a real ``poolq flower`` on 127.0.0.1 (a free port), read
through Flower's HTTP API, and its pages loaded in headless Chromium
(Debian's ``chromium`` and ``chromium-driver``; without them the browser
test is skipped, unless ``POOLQ_REQUIRE_BROWSER=1``, as ``.ci/run`` sets
once it installed them, makes it fail).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import redis

import poolq
from poolq import AgentError, Handle
from poolq.testing import PoolFactory, RunningPool, app_server, free_port

T = TypeVar("T")

POOL = "flowerq"
QUEUE = f"poolq.{POOL}"
#: Seconds any one wait in these tests may take.
WAIT = 30.0
#: Calls queued behind the busy agent.
QUEUED = 4


class Gate(poolq.Agent):
    """Echoes, shouts, fails on demand, and holds itself busy until a Redis list gets an item."""

    def setup(self) -> None:
        self.redis = redis.Redis.from_url(self.options["redis_url"], decode_responses=True)

    def handle(self, text: str = "") -> dict[str, Any]:
        return {"text": text, "agent": self.name}

    @poolq.operation
    def shout(self, text: str) -> str:
        return text.upper()

    @poolq.operation
    def fail(self, message: str) -> None:
        raise ValueError(message)

    @poolq.operation
    def hold(self, key: str, seconds: float) -> bool:
        """Say it holds (on ``key:held``), then wait up to ``seconds`` for an item on ``key``."""
        self.redis.rpush(f"{key}:held", self.name)
        return self.redis.blpop([key], timeout=seconds) is not None


@dataclass
class Flower:
    url: str
    log: Path

    def api(self, path: str) -> Any:
        """GET ``path`` of Flower's API as JSON; None when Flower answers 404 (not known yet)."""
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            error.close()
            if error.code == 404:
                return None
            log = self.log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"GET {path}: HTTP {error.code}\n{log}") from None

    def task(self, task_id: str, state: str) -> dict[str, Any]:
        """The task as Flower knows it, once it reached ``state``."""

        def known() -> dict[str, Any] | None:
            info = self.api(f"/api/task/info/{task_id}")
            return info if info and info.get("state") == state else None

        return until(f"task {task_id} in state {state} in Flower", known)

    def depth(self) -> int | None:
        """Messages waiting in the pool's queue, as Flower's /api/queues/length counts them."""
        lengths = self.api("/api/queues/length") or {}
        return {q["name"]: q["messages"] for q in lengths.get("active_queues", [])}.get(QUEUE)


def until(what: str, probe: Callable[[], T | None], timeout: float = WAIT) -> T:
    """Poll ``probe`` until it gives something truthy; fail saying ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:g}s (last seen: {last!r})")


@pytest.fixture(scope="module")
def pool(module_pools: PoolFactory, poolq_broker: str) -> RunningPool:
    """One agent and no overflow: one busy call jams the pool."""
    return module_pools.start(
        POOL, f"{__name__}:Gate", size=1, max_overflow=0, timeout=WAIT * 2, options={"redis_url": poolq_broker}
    )


@pytest.fixture(scope="module")
def flower(module_pools: PoolFactory, pool: RunningPool) -> Iterator[Flower]:
    """``poolq flower`` for the pool's deployment, as a user starts it (on the loopback its API is open)."""
    port = free_port()
    argv = [sys.executable, "-m", "poolq", "flower", "--address", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in module_pools.environment(pool).items() if not k.startswith("FLOWER_")}
    log = module_pools.directory / "flower.log"
    with app_server(argv, port, env, log) as url:  # stopped by pid when done
        yield Flower(url, log)


@pytest.fixture(scope="module")
def agent(pool: RunningPool) -> str:
    """The pool's one agent's name (it answers with it)."""
    name: str = pool.client.call(POOL, text="who")["agent"]
    return name


@contextlib.contextmanager
def jammed(pool: RunningPool, queued: int) -> Iterator[list[Handle]]:
    """The pool's agent busy on a held call, and ``queued`` casts waiting behind it; released on exit."""
    key = f"test:{POOL}:gate:{uuid.uuid4().hex}"
    state = pool.client.state
    holding = pool.client.cast(POOL, key, WAIT * 2, op="hold")
    try:
        until("the agent holding", lambda: state.llen(f"{key}:held"))
        handles = [pool.client.cast(POOL, f"queued {i}", op="shout") for i in range(queued)]
        yield handles
    finally:
        state.rpush(key, "go")
        try:
            assert holding.result(timeout=WAIT) is True
        finally:
            state.delete(key, f"{key}:held")
    assert [h.result(timeout=WAIT) for h in handles] == [f"QUEUED {i}" for i in range(queued)]


def test_task_info_names_the_operation_and_the_agent(pool: RunningPool, flower: Flower, agent: str) -> None:
    node = pool.workers[0].node
    shout = pool.client.cast(POOL, "hi", op="shout")
    assert shout.result(timeout=WAIT) == "HI"
    info = flower.task(shout.id, "SUCCESS")
    assert info["name"] == f"{QUEUE}.shout"
    assert info["worker"] == node
    # The arguments as the caller gave them; poolq's own options stay in headers.
    assert (info["args"], info["kwargs"]) == ("('hi',)", "{}")
    # The result Flower shows says who served the call, not what it returned.
    assert ast.literal_eval(info["result"]) == {"pool": POOL, "op": "shout", "agent": agent}

    plain = pool.client.cast(POOL, text="plain")
    assert plain.result(timeout=WAIT) == {"text": "plain", "agent": agent}
    info = flower.task(plain.id, "SUCCESS")
    assert info["name"] == f"{QUEUE}.handle"
    assert (info["args"], info["kwargs"]) == ("()", "{'text': 'plain'}")
    assert ast.literal_eval(info["result"]) == {"pool": POOL, "op": "handle", "agent": agent}

    # A call (not a cast) is listed under its operation's name too.
    assert pool.client.call(POOL, "called", op="shout") == "CALLED"
    listed = until(
        "the call in Flower's task list",
        lambda: [
            t
            for t in (flower.api(f"/api/tasks?taskname={QUEUE}.shout&state=SUCCESS") or {}).values()
            if t["args"] == "('called',)"
        ],
    )
    assert ast.literal_eval(listed[0]["result"])["agent"] == agent

    failing = pool.client.cast(POOL, "no luck", op="fail")
    with pytest.raises(AgentError):
        failing.result(timeout=WAIT)
    info = flower.task(failing.id, "FAILURE")
    assert info["name"] == f"{QUEUE}.fail"
    assert "no luck" in info["exception"]


def test_queue_depth_and_workers_of_a_jammed_pool(pool: RunningPool, flower: Flower) -> None:
    node = pool.workers[0].node
    workers = until("the pool's node in /api/workers", lambda: (flower.api("/api/workers?refresh=1") or {}).get(node))
    assert QUEUE in [q["name"] for q in workers.get("active_queues", [])]

    with jammed(pool, QUEUED):
        # Queue lengths work: Flower reads the broker through kombu's stock Redis transport.
        until(f"{QUEUE} at depth {QUEUED}", lambda: flower.depth() == QUEUED)
    until(f"{QUEUE} empty", lambda: flower.depth() == 0)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium driven by chromedriver; every process it started is gone afterwards."""
    # Debian's packages put both in /usr/bin, which a trimmed PATH may lack.
    chromium = shutil.which("chromium") or shutil.which("chromium", path="/usr/bin")
    chromedriver = shutil.which("chromedriver") or shutil.which("chromedriver", path="/usr/bin")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", chromedriver)) if path is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium")  # pip install -e '.[test]'
    if missing:
        reason = f"no {' nor '.join(missing)} here (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("POOLQ_REQUIRE_BROWSER") == "1":
            pytest.fail(f"POOLQ_REQUIRE_BROWSER=1, but {reason}")
        pytest.skip(reason)
    assert chromium is not None and chromedriver is not None

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tmp_path_factory.mktemp("chromium")
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root, in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    service = Service(executable_path=chromedriver, port=free_port(), log_output=str(profile / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    assert service.process is not None
    started = [psutil.Process(service.process.pid)]

    def note_children() -> None:
        with contextlib.suppress(psutil.Error):
            started.extend(c for c in started[0].children(recursive=True) if c not in started)

    note_children()
    try:
        driver.set_page_load_timeout(WAIT)
        yield driver
    finally:
        note_children()
        try:
            driver.quit()
        finally:
            # By pid, each process it started (psutil.Process refuses a pid used again since).
            _, alive = psutil.wait_procs(started, timeout=5)
            for process in alive:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            psutil.wait_procs(alive, timeout=5)


def page_text(driver: Any, url: str, element_id: str, *expected: str) -> str:
    """Load ``url`` and wait until the element ``element_id`` shows every one of ``expected``; its text.

    What it shows is its rendered text (Selenium's ``text``: what is visible, not hidden markup).
    """
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)

    seen = [""]

    def shown(d: Any) -> str | None:
        try:
            seen[0] = d.find_element(By.ID, element_id).text
        except StaleElementReferenceException:  # the table redrawn meanwhile
            return None
        # Long names wrap in narrow columns: compare without the whitespace.
        squeezed = "".join(seen[0].split())
        return seen[0] if all("".join(e.split()) in squeezed for e in expected) else None

    try:
        return str(WebDriverWait(driver, WAIT, poll_frequency=0.2).until(shown))
    except TimeoutException:
        raise AssertionError(f"{url}: #{element_id} never showed all of {expected}; it showed:\n{seen[0]}") from None


def test_dashboard_broker_and_tasks_pages_in_chromium(
    browser: Any, pool: RunningPool, flower: Flower, agent: str
) -> None:
    # (The browser first: without one, the test is skipped before any pool starts.)
    from selenium.webdriver.common.by import By

    node = pool.workers[0].node
    page_text(browser, f"{flower.url}/", "workers-table", node)

    with jammed(pool, QUEUED):
        until(f"{QUEUE} at depth {QUEUED}", lambda: flower.depth() == QUEUED)
        page_text(browser, f"{flower.url}/broker", "queue-table", QUEUE)
        row = browser.find_element(By.XPATH, f"//table[@id='queue-table']//tr[td[normalize-space()='{QUEUE}']]")
        messages = row.find_elements(By.TAG_NAME, "td")[1].get_attribute("textContent")
        assert messages is not None and messages.strip() == str(QUEUED)

    shout = pool.client.cast(POOL, "seen in chromium", op="shout")
    assert shout.result(timeout=WAIT) == "SEEN IN CHROMIUM"
    flower.task(shout.id, "SUCCESS")
    # The task list is a table Flower fills by ajax: wait for the row.
    page_text(browser, f"{flower.url}/tasks", "tasks-table", shout.id, f"{QUEUE}.shout", agent, "seen in chromium")


def test_a_node_started_after_flower_has_its_queue_listed(poolq_pools: PoolFactory, poolq_broker: str) -> None:
    # Given Flower running before any node of the pool (a Procfile or compose stack starts them together)
    late = poolq_pools.start("flowerlate", f"{__name__}:Gate", nodes=0, wait=False, options={"redis_url": poolq_broker})
    poolq_pools.start_maintenance(late)  # a node Flower sees at its start: the maintainer
    maintainer = "maintainer-flowerlate@poolq-test"
    until("the maintainer answers", lambda: late.client.app.control.ping([maintainer], timeout=1.0))
    port = free_port()
    argv = [sys.executable, "-m", "poolq", "flower", "--address", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in poolq_pools.environment(late).items() if not k.startswith("FLOWER_")}
    with app_server(argv, port, env, poolq_pools.directory / "flower-late.log") as url:
        flower = Flower(url, poolq_pools.directory / "flower-late.log")
        until("Flower knows the maintainer", lambda: maintainer in (flower.api("/api/workers?refresh=1") or {}))
        # When the node starts afterwards and calls wait in its queue
        poolq_pools.add_node(late)
        handles = [late.client.cast("flowerlate", text=f"t{n}") for n in range(3)]
        for handle in handles:
            handle.result(timeout=WAIT)
        # Then Flower lists the queue without being asked to refresh its workers
        lengths = flower.api("/api/queues/length")
        assert {"name": "poolq.flowerlate", "messages": 0} in lengths["active_queues"]
