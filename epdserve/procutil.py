"""Child-process helpers: die with the parent, stop with SIGTERM then SIGKILL."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the parent dies (Linux), so no orphan survives
    even a SIGKILLed launcher."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(process: subprocess.Popen, *, timeout_s: float) -> int | None:
    """SIGTERM, wait up to timeout_s, then SIGKILL. Returns the exit code."""
    return stop_processes([process], timeout_s=timeout_s)[0]


def stop_processes(processes: list[subprocess.Popen], *, timeout_s: float) -> list[int | None]:
    """SIGTERM each (once), wait for all up to timeout_s in total, SIGKILL what is left.
    Returns the exit codes in order."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return [process.returncode for process in processes]
