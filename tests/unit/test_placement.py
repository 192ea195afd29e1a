"""Device placement: the pool keys, the GPU count (never through CUDA), and which GPUs each agent gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from poolq import ConfigError, PoolConfig, load_config
from poolq.worker import placement
from poolq.worker.placement import Gpus, PlacementBook, gpus_for, parse_nvidia_smi, parse_visible, place, visible_gpus

ROOT = Path(__file__).resolve().parents[2]
FOUR = Gpus(("0", "1", "2", "3"), "CUDA_VISIBLE_DEVICES='0,1,2,3'")
NONE = Gpus((), "CUDA_VISIBLE_DEVICES=''")


def pool(**keys: Any) -> PoolConfig:
    return PoolConfig.model_validate({"name": "gpu", "agent": "a:B", **keys})


# -- the assignment: slot index, GPUs per agent, visible GPUs -> the agent's GPUs --------------


@pytest.mark.parametrize(
    ("index", "per_agent", "visible", "expected"),
    [
        (0, 1, "0123", "0"),
        (3, 1, "0123", "3"),
        (4, 1, "0123", "0"),  # a fifth agent on four GPUs shares the first
        (0, 2, "0123", "01"),
        (1, 2, "0123", "23"),
        (2, 2, "0123", "01"),  # wraps: more agents than groups
        (0, 4, "0123", "0123"),
        (5, 4, "0123", "0123"),
        (1, 2, "01234", "23"),  # the fifth GPU is left over
        (2, 2, "01234", "01"),  # ... and never used, not even when agents wrap
        (1, 3, "01234567", "345"),
        (2, 3, "01234567", "012"),
        (0, 1, "7", "7"),
    ],
)
def test_agents_take_consecutive_groups_by_slot(index: int, per_agent: int, visible: str, expected: str) -> None:
    assert gpus_for(index, per_agent, list(visible)) == tuple(expected)


def test_the_ids_are_kept_as_given_uuids_included() -> None:
    uuids = ["GPU-aaaa", "GPU-bbbb", "MIG-cccc"]
    assert gpus_for(1, 1, uuids) == ("GPU-bbbb",)
    assert gpus_for(0, 2, uuids) == ("GPU-aaaa", "GPU-bbbb")


@pytest.mark.parametrize("visible", range(9))
@pytest.mark.parametrize("per_agent", range(1, 5))
def test_every_combination_spreads_evenly_and_wraps(visible: int, per_agent: int) -> None:
    gpus = [f"GPU-{i}" for i in range(visible)]
    if visible < per_agent:
        # Given fewer GPUs than one agent needs, Then no agent is placed
        with pytest.raises(ValueError, match=f"{per_agent} GPU.* per agent, but {visible} visible"):
            gpus_for(0, per_agent, gpus)
        return
    groups = visible // per_agent
    for index in range(3 * groups + 2):
        got = gpus_for(index, per_agent, gpus)
        # Each agent gets per_agent consecutive GPUs, starting on a group boundary
        assert len(got) == per_agent
        start = gpus.index(got[0])
        assert start % per_agent == 0 and list(got) == gpus[start : start + per_agent]
        # ... the same as the agent one round of groups earlier (wrapping)
        assert got == gpus_for(index % groups, per_agent, gpus)
    # The first `groups` agents share nothing and cover every GPU a group can hold
    first = [gpu for index in range(groups) for gpu in gpus_for(index, per_agent, gpus)]
    assert sorted(first) == sorted(gpus[: groups * per_agent]) and len(set(first)) == len(first)
    # However many agents, no group carries two more than another
    for agents in range(1, 3 * groups + 2):
        load = Counter(gpus_for(index, per_agent, gpus) for index in range(agents))
        assert max(load.values()) - min(load.values()) <= 1
        assert len(load) == min(agents, groups)


def test_a_negative_slot_is_refused() -> None:
    with pytest.raises(ValueError):
        gpus_for(-1, 1, ["0"])


# -- one process's agents --------------------------------------------------------------------


def test_a_prefork_agent_sees_only_its_gpus_as_cuda_0() -> None:
    spread = pool(gpus_per_agent=2)
    assert place(spread, 0, 1, FOUR) == placement.Placement(visible="0,1", devices=("cuda:0",))
    assert place(spread, 1, 1, FOUR) == placement.Placement(visible="2,3", devices=("cuda:0",))
    assert place(spread, 2, 1, FOUR) == placement.Placement(visible="0,1", devices=("cuda:0",))


def test_device_cuda_alone_is_one_gpu_per_agent() -> None:
    assert [place(pool(device="cuda"), i, 1, FOUR).visible for i in range(5)] == ["0", "1", "2", "3", "0"]
    assert place(pool(device="cuda", gpus_per_agent=2), 1, 1, FOUR).visible == "2,3"


def test_a_threads_process_shows_its_agents_gpus_and_gives_each_its_own_device() -> None:
    threads = pool(device="cuda", worker_pool="threads", size=3)
    assert place(threads, 0, 3, FOUR) == placement.Placement(visible="0,1,2", devices=("cuda:0", "cuda:1", "cuda:2"))
    # More agents than GPUs: they wrap onto the same devices
    assert place(threads, 0, 6, FOUR).devices == ("cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1")
    # The host's order is kept (a device number means the same GPU as in the process's list)
    assert place(threads, 0, 2, Gpus(("3", "1", "0"), "")) == placement.Placement("3,1", ("cuda:0", "cuda:1"))


@pytest.mark.parametrize("device", [None, "cpu", "mps"])
def test_without_cuda_the_environment_is_left_alone(device: str | None) -> None:
    assert place(pool(device=device), 3, 2, NONE) == placement.Placement(visible=None, devices=(device, device))


def test_a_pinned_cuda_device_is_handed_as_is() -> None:
    assert place(pool(device="cuda:1"), 3, 1, FOUR) == placement.Placement(visible=None, devices=("cuda:1",))


@pytest.mark.parametrize(
    ("keys", "gpus", "message"),
    [
        ({"device": "cuda"}, NONE, "pool 'gpu' asks for 1 GPU per agent, but this host shows no GPU (CUDA_VISIBLE_"),
        ({"gpus_per_agent": 2}, Gpus(("0",), "nvidia-smi -L"), "asks for 2 GPUs per agent, but this host shows 1 GPU"),
        ({"device": "cuda:4"}, FOUR, "asks for cuda:4, but this host shows 4 GPUs (CUDA_VISIBLE_DEVICES='0,1,2,3')"),
        ({"device": "cuda:0"}, Gpus((), "no CUDA_VISIBLE_DEVICES, and no nvidia-smi"), "shows no GPU (no CUDA_VIS"),
    ],
)
def test_asking_for_gpus_a_host_lacks_is_an_error_that_says_so(keys: dict[str, Any], gpus: Gpus, message: str) -> None:
    placed = place(pool(**keys), 0, 1, gpus)
    assert message in placed.error
    assert (placed.visible, placed.devices) == (None, (None,))


def test_apply_narrows_cuda_visible_devices_only_when_placed() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "OTHER": "x"}
    placement.apply(placement.Placement(visible=None, devices=("cpu",)), env)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    placement.apply(placement.Placement(visible="2,3", devices=("cuda:0",)), env)
    assert env == {"CUDA_VISIBLE_DEVICES": "2,3", "OTHER": "x"}


def test_a_process_places_its_agents_at_the_index_its_node_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "_detected", FOUR)
    monkeypatch.setattr(placement, "NEXT_INDEX", 1)
    assert placement.for_process(pool(gpus_per_agent=2), 1).visible == "2,3"
    # Forked by no node (solo, threads): index 0
    monkeypatch.setattr(placement, "NEXT_INDEX", None)
    assert placement.for_process(pool(gpus_per_agent=2), 1).visible == "0,1"
    # No device: nothing is read, nothing is placed
    monkeypatch.setattr(placement, "_detected", None)
    assert placement.for_process(pool(), 2) == placement.Placement(devices=(None, None))
    assert placement._detected is None


# -- counting the GPUs without CUDA ------------------------------------------------------------

SMI = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-aaaa-bbbb-cccc-000000000000)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-22222222-aaaa-bbbb-cccc-000000000000)
  MIG 3g.20gb     Device  0: (UUID: MIG-33333333-aaaa-bbbb-cccc-000000000000)
  MIG 3g.20gb     Device  1: (UUID: MIG-44444444-aaaa-bbbb-cccc-000000000000)
GPU 2: NVIDIA L4 (UUID: GPU-55555555-aaaa-bbbb-cccc-000000000000)
"""


def test_nvidia_smi_gpus_are_counted_by_uuid_and_mig_instances_replace_their_gpu() -> None:
    assert parse_nvidia_smi(SMI) == (
        "GPU-11111111-aaaa-bbbb-cccc-000000000000",
        "MIG-33333333-aaaa-bbbb-cccc-000000000000",
        "MIG-44444444-aaaa-bbbb-cccc-000000000000",
        "GPU-55555555-aaaa-bbbb-cccc-000000000000",
    )
    assert parse_nvidia_smi("") == ()
    assert parse_nvidia_smi("No devices were found\n") == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0,1,2,3", ("0", "1", "2", "3")),
        (" 2 , 0 ", ("2", "0")),
        ("GPU-abc,MIG-def", ("GPU-abc", "MIG-def")),
        ("", ()),  # set and empty: CUDA shows no GPU
        ("-1", ()),
        ("0,1,-1,2", ("0", "1")),  # CUDA stops at the first invalid entry
        ("NoDevFiles", ()),  # what some batch schedulers set on a node without GPUs
    ],
)
def test_cuda_visible_devices_is_read_as_cuda_reads_it(value: str, expected: tuple[str, ...]) -> None:
    assert parse_visible(value) == expected


def test_the_gpus_come_from_cuda_visible_devices_else_nvidia_smi_else_none() -> None:
    def smi() -> str:
        raise AssertionError("nvidia-smi is not run when CUDA_VISIBLE_DEVICES is set")

    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,0"}, smi) == Gpus(("1", "0"), "CUDA_VISIBLE_DEVICES='1,0'")
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, smi).ids == ()
    assert visible_gpus({}, lambda: SMI) == Gpus(parse_nvidia_smi(SMI), "nvidia-smi -L")
    assert visible_gpus({}, lambda: None) == Gpus((), "no CUDA_VISIBLE_DEVICES, and no nvidia-smi to list the GPUs")


# -- a prefork node's placement indexes --------------------------------------------------------


def test_a_node_gives_its_processes_the_lowest_free_index() -> None:
    book = PlacementBook()
    # Given a node starting three processes (pids known only after each fork)
    assert book.before_fork([]) == 0
    assert book.before_fork([100]) == 1
    assert book.before_fork([100, 101]) == 2
    # When overflow grows one more
    assert book.before_fork([100, 101, 102]) == 3
    # Then each process holds its own index
    assert book.before_fork([100, 101, 102, 103]) == 4
    assert book.held == {100: 0, 101: 1, 102: 2, 103: 3}


def test_a_warm_replacement_keeps_the_index_of_the_process_it_replaces() -> None:
    book = PlacementBook()
    for live in ([], [100], [100, 101]):
        book.before_fork(live)
    # Given processes 100, 101, 102 on indexes 0, 1, 2: 101 reached a limit
    # When its replacement is forked while 101 still serves
    assert book.before_fork([100, 101, 102], replaces=101) == 1
    # Then, once 101 retired, its replacement (103) holds index 1: the next process gets 3
    assert book.before_fork([100, 102, 103]) == 3
    assert book.held == {100: 0, 102: 2, 103: 1}
    # And a replacement of the replacement keeps it still
    assert book.before_fork([100, 102, 103, 104], replaces=103) == 1


def test_a_process_that_died_leaves_its_index_to_the_one_started_in_its_place() -> None:
    book = PlacementBook()
    for live in ([], [100], [100, 101]):
        book.before_fork(live)
    # Given 101 (index 1) crashed; billiard starts another
    assert book.before_fork([100, 102]) == 1
    # A replacement asked for a process that is gone gets a free index
    assert book.before_fork([100, 102, 103], replaces=101) == 3


def test_a_scaled_down_index_is_reused_first() -> None:
    book = PlacementBook()
    for live in ([], [100], [100, 101], [100, 101, 102]):
        book.before_fork(live)
    # 100 (index 0) retired by a scale-down, then the node grows again
    assert book.before_fork([101, 102, 103]) == 0


# -- the pool keys --------------------------------------------------------------------------


def write(tmp_path: Path, table: str) -> Path:
    path = tmp_path / "pools.toml"
    path.write_text(f'[pools.gpu]\nagent = "a:B"\n{table}\n')
    return path


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("", (None, None)),
        ('device = "cpu"', ("cpu", None)),
        ('device = "cuda"', ("cuda", None)),
        ('device = "cuda:3"', ("cuda:3", None)),
        ('device = "mps"', ("mps", None)),
        ("gpus_per_agent = 2", (None, 2)),
        ('device = "cuda"\ngpus_per_agent = 4', ("cuda", 4)),
        ('device = "cuda"\nworker_pool = "threads"', ("cuda", None)),
        ('gpus_per_agent = 1\nworker_pool = "threads"', (None, 1)),
        ('gpus_per_agent = 2\nworker_pool = "solo"', (None, 2)),
    ],
)
def test_device_keys(tmp_path: Path, table: str, expected: tuple[Any, Any]) -> None:
    gpu = load_config(write(tmp_path, table), env={}).pool("gpu")
    assert (gpu.device, gpu.gpus_per_agent) == expected


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('device = "gpu"', "key 'device': Value error, a device is 'cpu', 'cuda', 'cuda:N' (N: a GPU's number) or"),
        ('device = "cuda:"', "key 'device': Value error, a device is"),
        ("gpus_per_agent = 0", "key 'gpus_per_agent': Input should be greater than or equal to 1"),
        (
            'device = "cpu"\ngpus_per_agent = 1',
            "key 'gpus_per_agent': Value error, spreads the agents over GPUs: it needs device = 'cuda' (or none), "
            "not 'cpu'",
        ),
        ('device = "cuda:1"\ngpus_per_agent = 1', "key 'gpus_per_agent': Value error, spreads the agents over GPUs"),
        (
            'worker_pool = "threads"\ngpus_per_agent = 2',
            "key 'gpus_per_agent': Value error, a threads node runs every agent in one process",
        ),
    ],
)
def test_bad_device_keys_are_one_clear_error(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, table), env={})
    assert f"pool 'gpu', {message}" in str(caught.value)


def test_device_keys_from_the_environment(tmp_path: Path) -> None:
    env = {"POOLQ_GPU__DEVICE": "cuda", "POOLQ_GPU__GPUS_PER_AGENT": "2"}
    gpu = load_config(write(tmp_path, ""), env=env).pool("gpu")
    assert (gpu.device, gpu.gpus_per_agent) == ("cuda", 2)


# -- CUDA stays out of the node's main process ---------------------------------------------------


def test_the_worker_side_places_agents_without_importing_torch(tmp_path: Path) -> None:
    # Everything a node's main process runs for a GPU pool before it forks: the
    # worker modules, the embedder's module, the configuration, the GPU count.
    script = (
        "import json, sys\n"
        "import poolq.worker.step, poolq.worker.host, poolq.worker.placement as placement, workers.embedder\n"
        "from poolq import load_config\n"
        "pool = load_config(env={}).pool('embed')\n"
        "pool = pool.model_copy(update={'device': 'cuda', 'gpus_per_agent': 2})\n"
        "error = placement.check(pool)\n"
        "heavy = ('torch', 'sentence_transformers', 'transformers')\n"
        "print(json.dumps({'error': error, 'loaded': [m for m in sys.modules if m.split('.')[0] in heavy]}))\n"
    )
    env = {**os.environ, "POOLQ_CONFIG": str(ROOT / "config" / "pools.toml"), "CUDA_VISIBLE_DEVICES": "0,1"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) == {"error": "", "loaded": []}
