"""Device placement: which accelerator each agent of a pool runs on.

A pool's ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``) and
``gpus_per_agent`` say where its agents run; the agent reads the result as
``self.device``. ``cuda`` (one GPU each) and ``gpus_per_agent`` spread a
node's agents over the GPUs its host shows: the agent with placement index
``k`` takes the ``k``-th group of ``gpus_per_agent`` GPUs, wrapping round
(agents then share a group) when there are more agents than groups.

CUDA is never initialised here, nor anywhere in a node's main process: the
GPUs are counted from ``CUDA_VISIBLE_DEVICES``, or else ``nvidia-smi -L``.
Each prefork child sets ``CUDA_VISIBLE_DEVICES`` to its own group before its
agent's ``setup()``, so its agent finds them as ``cuda:0``, ``cuda:1``... A
``threads`` node has one process for all its agents: it shows them all its
GPUs and gives each agent its own ``cuda:N`` (one GPU each, see
:class:`poolq.PoolConfig`). A ``solo`` node's one agent takes the first group.

A prefork child's placement index is picked by its node's main process just
before the fork (:class:`PlacementBook`): the lowest index no live process
of the node holds, or, for a warm replacement, the index of the process it
replaces, so a recycled agent keeps its GPUs. Billiard numbers its processes
too, but a warm replacement starts while the process it replaces still runs,
so billiard would give it a new number, and with it GPUs another agent uses.

A pool that asks for GPUs on a host that shows none fails its agents'
setups with a message that says so (the circuit breaker counts them like any
failed setup, and callers get that message); its node logs it once at start.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from billiard.process import current_process

from ..config import PoolConfig

logger = logging.getLogger("poolq.worker")

#: The environment variable that says which GPUs a CUDA process sees, and in which order.
VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
#: Seconds ``nvidia-smi -L`` may take.
NVIDIA_SMI_TIMEOUT = 10.0

#: Set in a prefork node's main process just before each fork: the new child
#: reads it (it inherits the parent's memory) as its placement index. None in
#: a process no node forked (solo, threads: index 0).
NEXT_INDEX: int | None = None

_UUID = re.compile(r"\(UUID: ([^)\s]+)\)")


@dataclass(frozen=True)
class Gpus:
    """The GPUs a process may use, as ``CUDA_VISIBLE_DEVICES`` entries, and where that was read."""

    ids: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class Placement:
    """Where the agents of one worker process run."""

    #: Set as ``CUDA_VISIBLE_DEVICES`` before the first setup (None: the environment stays as it is).
    visible: str | None = None
    #: Each agent's ``self.device``, by agent slot (None where the pool sets no device).
    devices: tuple[str | None, ...] = (None,)
    #: Why the agents cannot be placed ('' when they can): their setups fail with it.
    error: str = ""


def gpus_each(pool: PoolConfig) -> int | None:
    """GPUs each agent of ``pool`` gets when the pool spreads its agents over GPUs; None when it does not."""
    if pool.gpus_per_agent is not None:
        return pool.gpus_per_agent
    return 1 if pool.device == "cuda" else None


def uses_cuda(pool: PoolConfig) -> bool:
    """Whether the pool's agents run on CUDA GPUs (``cuda``, ``cuda:N`` or ``gpus_per_agent``)."""
    return gpus_each(pool) is not None or (pool.device or "").startswith("cuda")


def gpus_for(index: int, per_agent: int, visible: Sequence[str]) -> tuple[str, ...]:
    """The GPUs of the agent with placement ``index``: the index-th group of ``per_agent`` GPUs, wrapping.

    Groups are consecutive GPUs in ``visible`` order; when ``len(visible)`` is
    no multiple of ``per_agent`` the GPUs left over at the end stay unused.
    Example::

        gpus_for(1, 2, ["0", "1", "2", "3"])    # ('2', '3')
        gpus_for(2, 2, ["0", "1", "2", "3"])    # ('0', '1'): more agents than groups, they share

    Raises:
        ValueError: fewer than ``per_agent`` GPUs are visible, or a negative index.
    """
    if index < 0 or per_agent < 1:
        raise ValueError(f"need index >= 0 and per_agent >= 1, got {index} and {per_agent}")
    groups = len(visible) // per_agent
    if groups == 0:
        raise ValueError(f"{per_agent} GPU{'s' if per_agent > 1 else ''} per agent, but {len(visible)} visible")
    start = (index % groups) * per_agent
    return tuple(visible[start : start + per_agent])


def place(pool: PoolConfig, index: int, slots: int, gpus: Gpus) -> Placement:
    """Where the ``slots`` agents of a process with placement ``index`` run (slot ``i``: index ``index + i``)."""
    per_agent = gpus_each(pool)
    if per_agent is None:
        device = pool.device
        if device is not None and device.startswith("cuda:") and int(device[5:]) >= len(gpus.ids):
            return Placement(devices=(None,) * slots, error=_no_gpu(pool, device, gpus))
        return Placement(devices=(device,) * slots)
    try:
        groups = [gpus_for(index + i, per_agent, gpus.ids) for i in range(slots)]
    except ValueError:
        wanted = f"{per_agent} GPU{'s' if per_agent > 1 else ''} per agent"
        return Placement(devices=(None,) * slots, error=_no_gpu(pool, wanted, gpus))
    # The process sees only its agents' GPUs, in the host's order: agent i uses the first of its group.
    used = [gpu for gpu in gpus.ids if any(gpu in group for group in groups)]
    return Placement(visible=",".join(used), devices=tuple(f"cuda:{used.index(group[0])}" for group in groups))


def _no_gpu(pool: PoolConfig, wanted: str, gpus: Gpus) -> str:
    shown = f"{len(gpus.ids)} GPU{'' if len(gpus.ids) == 1 else 's'}" if gpus.ids else "no GPU"
    return f"pool {pool.name!r} asks for {wanted}, but this host shows {shown} ({gpus.source})"


def parse_visible(value: str) -> tuple[str, ...]:
    """The GPUs a ``CUDA_VISIBLE_DEVICES`` value names: indexes or UUIDs, up to the first invalid entry.

    As CUDA reads it: ``""`` and ``"-1"`` hide every GPU, and ``"0,1,-1,2"``
    shows only 0 and 1.
    """
    ids = []
    for entry in value.split(","):
        entry = entry.strip()
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        ids.append(entry)
    return tuple(ids)


def parse_nvidia_smi(listing: str) -> tuple[str, ...]:
    """The GPUs in ``nvidia-smi -L`` output, by UUID; a GPU split into MIG instances counts as its instances.

    UUIDs, not nvidia-smi's numbers: nvidia-smi numbers GPUs in PCI bus order,
    CUDA by default fastest first, and a UUID means the same GPU to both.
    """
    ids: list[str] = []
    gpu: str | None = None
    instances: list[str] = []
    for line in listing.splitlines():
        match = _UUID.search(line)
        if match is None:
            continue
        if line.lstrip().startswith("GPU "):
            if gpu is not None:
                ids += instances or [gpu]
            gpu, instances = match.group(1), []
        elif line.lstrip().startswith("MIG "):
            instances.append(match.group(1))
    if gpu is not None:
        ids += instances or [gpu]
    return tuple(ids)


def _nvidia_smi() -> str | None:
    """``nvidia-smi -L``'s output, or None where it is missing or fails."""
    path = shutil.which("nvidia-smi")
    if path is None:
        return None
    try:
        done = subprocess.run([path, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def visible_gpus(env: Mapping[str, str] | None = None, nvidia_smi: Callable[[], str | None] = _nvidia_smi) -> Gpus:
    """The GPUs this process may use, without importing torch or initialising CUDA.

    From ``CUDA_VISIBLE_DEVICES`` when it is set (even empty: then none),
    else from ``nvidia-smi -L``, else none.
    """
    env = os.environ if env is None else env
    value = env.get(VISIBLE_DEVICES)
    if value is not None:
        return Gpus(parse_visible(value), f"{VISIBLE_DEVICES}={value!r}")
    listing = nvidia_smi()
    if listing is None:
        return Gpus((), f"no {VISIBLE_DEVICES}, and no nvidia-smi to list the GPUs")
    return Gpus(parse_nvidia_smi(listing), "nvidia-smi -L")


_detected: Gpus | None = None


def detected_gpus() -> Gpus:
    """:func:`visible_gpus` of this process, read once.

    A node reads it before it forks, so its children inherit it unchanged
    (each then narrows its own ``CUDA_VISIBLE_DEVICES``) and never run nvidia-smi.
    """
    global _detected
    if _detected is None:
        _detected = visible_gpus()
    return _detected


def check(pool: PoolConfig) -> str:
    """In a node's main process, at start: read the GPUs if the pool uses CUDA; why its agents cannot be placed ('')."""
    if not uses_cuda(pool):
        return ""
    return place(pool, 0, 1, detected_gpus()).error


def for_process(pool: PoolConfig, slots: int) -> Placement:
    """Where this process's ``slots`` agents run, at the placement index its node picked.

    Without one (a process no node forked: solo, threads) the index is
    billiard's number of the process, 0 outside a pool.
    """
    if pool.device is None and gpus_each(pool) is None:
        return Placement(devices=(None,) * slots)
    gpus = detected_gpus() if uses_cuda(pool) else Gpus((), "")
    index = NEXT_INDEX if NEXT_INDEX is not None else int(getattr(current_process(), "index", 0) or 0)
    return place(pool, index, slots, gpus)


def apply(placement: Placement, environ: MutableMapping[str, str] | None = None) -> None:
    """Narrow ``CUDA_VISIBLE_DEVICES`` to the placement's GPUs, before any agent of this process sets up."""
    if placement.visible is not None:
        (os.environ if environ is None else environ)[VISIBLE_DEVICES] = placement.visible


def lowest_free(held: Collection[int]) -> int:
    """The smallest placement index not in ``held``."""
    index = 0
    while index in held:
        index += 1
    return index


class PlacementBook:
    """In a prefork node's main process: the placement index each of its processes holds.

    :meth:`before_fork` runs just before billiard forks a process (Celery's
    ``worker_before_create_process``); the process forked after one call is
    recorded at the next, by its pid (the only live pid not yet known).
    """

    def __init__(self) -> None:
        #: pid -> placement index, of the node's live processes.
        self.held: dict[int, int] = {}
        self._last: int | None = None

    def before_fork(self, live: Collection[int], replaces: int | None = None) -> int:
        """The placement index of the process about to be forked.

        Parameters:
            live: the pids of the node's processes alive now.
            replaces: the pid of the process it replaces, warm (that one still runs); None otherwise.
        """
        for pid in live:
            if pid not in self.held and self._last is not None:
                self.held[pid] = self._last
        for pid in [pid for pid in self.held if pid not in live]:
            del self.held[pid]
        index = self.held[replaces] if replaces in self.held else lowest_free(set(self.held.values()))
        self._last = index
        return index
