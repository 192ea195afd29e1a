"""Starting and stopping the processes poolq runs: always by pid, never by name."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import subprocess
import sys

import psutil

_PR_SET_PDEATHSIG = 1
# Resolved before any fork, so the child only makes one libc call.
_prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl if sys.platform == "linux" else None


def child_preexec() -> None:
    """In a new child, before exec: die with SIGTERM if the parent dies (Linux).

    A crashed ``poolq up`` or test run then leaves no orphaned broker or worker.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` to a child, wait up to ``timeout`` s, then SIGKILL it; return its exit code."""
    if process.poll() is None:
        try:
            process.send_signal(sig)
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
        except ProcessLookupError:
            pass
    return process.wait()


def stop_pid(pid: int, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop a process that is not our child (for example one a crashed run left)."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        proc.kill()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
