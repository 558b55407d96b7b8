"""Child-process helpers: start children that die with the parent, stop with SIGTERM then SIGKILL.

Children are started without a Python `preexec_fn` when `setpriv` can set the parent-death signal
instead: a preexec_fn forces a plain fork, and forking a process that runs gRPC can crash the
child before it execs (gRPC's fork handlers restart a poller whose epoll fd `close_fds` closes;
grpc/grpc#43055). Without one, Python starts the child with vfork and no fork handlers run.
"""

from __future__ import annotations

import ctypes
import shutil
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


def spawn(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """Popen whose child gets SIGTERM when this process dies (Linux). The child leads its own
    process group, so a terminal's Ctrl-C reaches only this process, which then stops its children
    in order with one SIGTERM each (a second signal would cut a child's drain short)."""
    popen_kwargs.setdefault("process_group", 0)
    setpriv = shutil.which("setpriv")
    if setpriv and sys.platform.startswith("linux"):
        return subprocess.Popen([setpriv, "--pdeathsig", "TERM", "--", *argv], **popen_kwargs)
    return subprocess.Popen(argv, preexec_fn=die_with_parent, **popen_kwargs)


def stop_process(process: subprocess.Popen, *, timeout_s: float, dump_stacks: bool = False) -> int | None:
    """SIGTERM, wait up to timeout_s, then SIGKILL. Returns the exit code."""
    return stop_processes([process], timeout_s=timeout_s, dump_stacks=dump_stacks)[0]


def stop_processes(processes: list[subprocess.Popen], *, timeout_s: float,
                   dump_stacks: bool = False) -> list[int | None]:
    """SIGTERM each (once), wait for all up to timeout_s in total, SIGKILL what is left (after
    SIGUSR1 and a moment to write its stacks, with `dump_stacks`: for epdserve services, which
    register faulthandler on it). Returns the exit codes in order."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if dump_stacks:
                process.send_signal(signal.SIGUSR1)
                time.sleep(1.0)
            process.kill()
            process.wait(timeout=5)
    return [process.returncode for process in processes]
