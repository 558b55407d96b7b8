"""A private `redis-server` on a free loopback port, for `epdserve up|demo` and the tests.

No persistence, bound to 127.0.0.1, protected mode on; it dies with its parent (PDEATHSIG)
and `stop()` waits for it to exit.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

from epdserve.errors import FailedPreconditionError
from epdserve.procutil import spawn, stop_process


class PrivateRedis:
    def __init__(self, binary: str = "redis-server", *, start_timeout_s: float = 10.0) -> None:
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._dir: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, attempts: int = 5) -> "PrivateRedis":
        path = shutil.which(self.binary)
        if path is None:
            raise FailedPreconditionError(
                f"{self.binary!r} not found on PATH: install Redis (Debian: apt-get install -y redis-server) "
                "or pass --redis-url"
            )
        self._path = path
        self._dir = tempfile.mkdtemp(prefix="epdserve-redis-")
        for _ in range(attempts):  # a free port can be taken between probe and bind: retry
            self.port = _free_port()
            if self._launch():
                return self
        raise FailedPreconditionError(f"redis-server did not start: {self._stderr_tail()}")

    def _launch(self) -> bool:
        self.process = spawn(
            [self._path, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "yes", "--dir", self._dir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        if self._wait_ready():
            return True
        stop_process(self.process, timeout_s=2)
        return False

    def kill(self) -> None:
        """SIGKILL the server (fault injection); `restart()` brings it back on the same port, empty."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=5)

    def restart(self) -> None:
        self.kill()
        if not self._launch():
            raise FailedPreconditionError(f"redis-server did not restart on port {self.port}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if _ping(self.port):
                return True
            time.sleep(0.02)
        return False

    def _stderr_tail(self) -> str:
        if self.process is None or self.process.stderr is None or self.process.poll() is None:
            return "timed out"
        return self.process.stderr.read().decode(errors="replace")[-500:]

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=5)
            if self.process.stderr is not None:
                self.process.stderr.close()
            self.process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "PrivateRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
