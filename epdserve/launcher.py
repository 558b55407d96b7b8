"""LocalCluster: the embedded default deployment on one machine.

Starts a private redis-server (unless given a URL), then encode, prefill and decode as separate
processes on free loopback ports, then the router pointed at them, all with the same security
flags (token file, TLS files; children also inherit the environment's EPDSERVE_AUTH_TOKEN*).
With `endpoints` it starts only the router, pointed at stage replicas that run elsewhere.
Every child dies with the launcher (PDEATHSIG); `stop()` sends SIGTERM, waits, then SIGKILLs
stragglers, and removes the shared-memory and scratch directories, so nothing is left behind.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

from epdserve.config import SecurityConfig, TraceConfig, config_to_args
from epdserve.errors import FailedPreconditionError
from epdserve.procutil import spawn, stop_process, stop_processes
from epdserve.redis_server import PrivateRedis

STAGES = ("encode", "prefill", "decode")
CLUSTER_DIR_PREFIX = "epdserve-cluster-"  # a cluster's log directory and shared-memory root
LAUNCHER_PID_FILE = "launcher.pid"        # in each: the launcher that owns it, locked (flock) while it lives


# Every stage of a local cluster shares one GPU: decode's automatic KV cache (its replicas together)
# takes this share of the memory free when it starts, leaving the rest to encode and prefill
# (weights and activations: a 16k-token prefill OOMed next to a 90% KV cache).
COLOCATED_DECODE_KV_FRACTION = 0.4


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    model_dir: pathlib.Path
    redis_url: str = ""              # "" = start a private redis-server
    router_host: str = "127.0.0.1"
    router_port: int = 0
    dtype: str = "auto"
    device: str = "auto"
    log_level: str = "WARNING"
    start_timeout_s: float = 300.0
    stop_timeout_s: float = 15.0
    redis_server_bin: str = "redis-server"
    # extra flags per stage ("decode"), then per replica ("decode-1": that replica only)
    stage_args: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    replicas: dict[str, int] = dataclasses.field(default_factory=dict)  # processes per stage (default 1)
    threads: int = -1                # torch threads per model service; -1 = auto (on CPU: the cores shared out)
    trace: TraceConfig = TraceConfig()  # tracing of every service (a --trace-file is shared by all of them)
    security: SecurityConfig = SecurityConfig()  # token file and TLS files of every service (and its clients)
    # stage -> addresses of replicas that already run elsewhere: start only a router pointed at them
    # (with `redis_url` it reads their mmcache index for cache-aware placement; no private Redis)
    endpoints: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # E+P colocated: no encode processes; each prefill replica also encodes (--with-encode, with the
    # "encode" stage_args) and the router runs --encode-colocated. With replicas={"prefill": 0} too
    # (aggregated), the decode replicas encode and prefill every prompt themselves
    encode_colocated: bool = False

    def __post_init__(self) -> None:
        stages = self.stages()
        if self.endpoints and sorted(self.endpoints) != sorted(stages):
            raise ValueError(f"endpoints: give addresses for every stage ({', '.join(stages)}); "
                             f"got {', '.join(sorted(self.endpoints)) or 'none'}")
        if any(not addresses for addresses in self.endpoints.values()):
            raise ValueError("endpoints: every stage needs at least one address")
        for stage in self.stages():
            if self.replicas.get(stage, 1) < 1:
                raise ValueError(f"replicas: {stage} needs at least 1 (only prefill may be 0, aggregated: "
                                 "with encode_colocated)")

    def stages(self) -> tuple[str, ...]:
        """The stages that run as processes of their own."""
        if not self.encode_colocated:
            return STAGES
        return ("prefill", "decode") if self.replicas.get("prefill", 1) > 0 else ("decode",)

    def encode_host(self) -> str:
        """The stage whose processes also encode (--with-encode); "" when encode runs alone."""
        if not self.encode_colocated:
            return ""
        return "prefill" if "prefill" in self.stages() else "decode"

    def names(self, stage: str) -> list[str]:
        """Child names of a stage's replicas: "encode", "encode-1", ... (none for a colocated encode)."""
        if stage not in self.stages():
            return []
        return [stage if i == 0 else f"{stage}-{i}" for i in range(self.replicas.get(stage, 1))]


@dataclasses.dataclass
class _Child:
    name: str
    process: subprocess.Popen
    ready_file: pathlib.Path
    log_file: pathlib.Path
    address: str = ""


class LocalCluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.redis: PrivateRedis | None = None
        self.redis_url = config.redis_url
        self.children: dict[str, _Child] = {}
        self.stop_log_tails: dict[str, str] = {}
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix=CLUSTER_DIR_PREFIX))
        self.shm_root = _shm_root() / f"{CLUSTER_DIR_PREFIX}{uuid.uuid4().hex[:12]}"
        self._claims: list[int] = []       # locked pid files of this launcher's directories
        self.router_address = ""
        self.router_http_address = ""    # the router's OpenAI HTTP host:port, when started with --http-port

    def start(self) -> str:
        """Start everything; returns the router address. Raises FailedPreconditionError (with the
        failing service's log tail) if a service exits or is not ready in time."""
        for root in (_shm_root(), self.workdir.parent):
            remove_abandoned_cluster_dirs(root)
        self._claims = [_claim(directory) for directory in (self.workdir, self.shm_root)]
        try:
            if not self.config.endpoints:
                self._start_stages()
            self._spawn("router", "router", self._router_args())
            self.router_address = self._wait_ready(self.children["router"])
            ready = json.loads(self.children["router"].ready_file.read_text())
            self.router_http_address = ready.get("http_address", "")
            return self.router_address
        except BaseException:
            self.stop()
            raise

    def _start_stages(self) -> None:
        if not self.redis_url:
            self.redis = PrivateRedis(self.config.redis_server_bin).start()
            self.redis_url = self.redis.url
        for stage in STAGES:
            for name in self.config.names(stage):
                self._spawn(name, stage, self._stage_args(stage, name))
        for stage in STAGES:
            for name in self.config.names(stage):
                self._wait_ready(self.children[name])

    def _common_args(self, name: str) -> list[str]:
        c = self.config
        trace = config_to_args(c.trace) if c.trace.enabled else []
        return ["--model", str(c.model_dir), "--log-level", c.log_level, "--port", "0",
                "--ready-file", str(self.workdir / f"{name}.ready"), *trace, *security_args(c.security)]

    def _stage_args(self, stage: str, name: str) -> list[str]:
        c = self.config
        extra = [*c.stage_args.get(stage, ()), *(c.stage_args.get(name, ()) if name != stage else ())]
        if stage == c.encode_host():
            extra = ["--with-encode", *c.stage_args.get("encode", ()), *extra]
        if stage == "decode" and self._on_gpu() and not {"--kv-cache-gib", "--kv-cache-fraction"} & set(extra):
            extra = ["--kv-cache-fraction", f"{COLOCATED_DECODE_KV_FRACTION / len(c.names(stage)):.3f}", *extra]
        return [*self._common_args(name), "--dtype", c.dtype, "--device", c.device, "--threads", str(self._threads()),
                "--redis-url", self.redis_url, "--shm-dir", str(self.shm_root / name), *extra]

    def _on_gpu(self) -> bool:
        return self.config.device not in ("auto", "cpu") or (self.config.device == "auto" and _has_cuda())

    def _threads(self) -> int:
        """Model services on one machine's CPU share its cores (each with torch's default of one
        thread per core they would spin against each other: tail latency grows ~10x on 2 cores)."""
        if self.config.threads >= 0:
            return self.config.threads
        if self._on_gpu():
            return 0
        services = sum(len(self.config.names(stage)) for stage in STAGES)
        return max(1, len(os.sched_getaffinity(0)) // services)

    def _router_args(self) -> list[str]:
        args = [*self._common_args("router"), "--host", self.config.router_host]
        args[args.index("--port") + 1] = str(self.config.router_port)
        if self.redis_url:
            args += ["--cache-redis-url", self.redis_url]
        for stage in self.config.stages():
            addresses = self.config.endpoints.get(stage) or [self.children[n].address for n in self.config.names(stage)]
            for address in addresses:
                args += [f"--{stage}", address]
        if self.config.encode_colocated:
            args.append("--encode-colocated")
        return [*args, *self.config.stage_args.get("router", ())]

    def _spawn(self, name: str, stage: str, args: list[str]) -> None:
        log_file = self.workdir / f"{name}.log"
        with open(log_file, "wb") as log:
            process = spawn([sys.executable, "-m", f"services.{stage}", *args],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_child_env())
        self.children[name] = _Child(name, process, self.workdir / f"{name}.ready", log_file)

    def _wait_ready(self, child: _Child) -> str:
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            if child.ready_file.is_file():
                child.address = json.loads(child.ready_file.read_text())["address"]
                return child.address
            if child.process.poll() is not None:
                raise FailedPreconditionError(
                    f"{child.name} service exited with code {child.process.returncode}:\n{self.log_tail(child.name)}"
                )
            time.sleep(0.05)
        raise FailedPreconditionError(f"{child.name} service not ready after {self.config.start_timeout_s:.0f} s")

    def metrics_address(self, name: str) -> str:
        """The host:port of a child's Prometheus `/metrics` endpoint (started with --metrics-port);
        "" when it serves none. Raises KeyError for an unknown child."""
        return json.loads(self.children[name].ready_file.read_text()).get("metrics_address", "")

    def scrape_metrics(self, name: str) -> "MetricSamples":
        """One GET of a child's `/metrics` (started with --metrics-port)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://{self.metrics_address(name)}/metrics", timeout=5) as response:
            text = response.read().decode()
        return MetricSamples({(s.name, tuple(sorted(s.labels.items()))): s.value
                              for family in text_string_to_metric_families(text) for s in family.samples})

    def log_tail(self, name: str, lines: int = 30) -> str:
        child = self.children.get(name)
        if child is None or not child.log_file.is_file():
            return ""
        return "\n".join(child.log_file.read_text(errors="replace").splitlines()[-lines:])

    def pids(self) -> dict[str, int]:
        pids = {name: child.process.pid for name, child in self.children.items()}
        if self.redis is not None and self.redis.process is not None:
            pids["redis"] = self.redis.process.pid
        return pids

    def stop(self) -> dict[str, int | None]:
        """Stop the router first (no new work), then the stages, then Redis. Returns exit codes;
        `stop_log_tails` keeps the log tail of each child that did not exit 0 (its logs are removed)."""
        codes: dict[str, int | None] = {}
        if "router" in self.children:
            codes["router"] = stop_process(self.children["router"].process, timeout_s=self.config.stop_timeout_s,
                                          dump_stacks=True)
        stages = [child for name, child in self.children.items() if name != "router"]
        exits = stop_processes([c.process for c in stages], timeout_s=self.config.stop_timeout_s, dump_stacks=True)
        codes.update({child.name: code for child, code in zip(stages, exits)})
        self.stop_log_tails = {name: self.log_tail(name, 60) for name, code in codes.items() if code != 0}
        self.children.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        shutil.rmtree(self.shm_root, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
        for fd in self._claims:
            os.close(fd)
        self._claims = []
        return codes

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class MetricSamples(dict):
    """Scraped samples keyed by (sample name, sorted label pairs)."""

    def value(self, name: str, **labels) -> float:
        """The sample's value; 0.0 when absent (a counter not incremented yet)."""
        return self.get((name, tuple(sorted(labels.items()))), 0.0)


def security_args(security: SecurityConfig) -> list[str]:
    """The flags that give a service (or `epdserve generate`) the settings of `security` (unset ones left out)."""
    return [arg for field in dataclasses.fields(security) if getattr(security, field.name)
            for arg in ("--" + field.name.replace("_", "-"), str(getattr(security, field.name)))]


def remove_abandoned_cluster_dirs(parent: pathlib.Path, *, unclaimed_after_s: float = 3600.0) -> list[pathlib.Path]:
    """Remove the cluster directories under `parent` (shared-memory pools, logs) left behind by a
    launcher that was killed before it could stop: those whose launcher no longer holds the lock on
    their pid file (it is released when the process ends, whatever ended it), and unclaimed ones
    (older code: no pid file) in which nothing changed for `unclaimed_after_s`. Returns them."""
    removed = []
    for directory in parent.glob(f"{CLUSTER_DIR_PREFIX}*"):
        try:
            abandoned = _abandoned(directory, unclaimed_after_s)
        except OSError:  # removed meanwhile, or not ours to look into
            continue
        if abandoned:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


def _abandoned(directory: pathlib.Path, unclaimed_after_s: float) -> bool:
    pid_file = directory / LAUNCHER_PID_FILE
    if not pid_file.exists():
        newest = max((p.stat().st_mtime for p in directory.rglob("*")), default=directory.stat().st_mtime)
        return time.time() - newest > unclaimed_after_s
    fd = os.open(pid_file, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its launcher lives
    finally:
        os.close(fd)
    return True


def _claim(directory: pathlib.Path) -> int:
    """Mark a cluster directory as this launcher's: its pid file, locked for as long as the
    returned descriptor stays open (children do not inherit it)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LAUNCHER_PID_FILE, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _shm_root() -> pathlib.Path:
    shm = pathlib.Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else pathlib.Path(tempfile.gettempdir())


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _child_env() -> dict[str, str]:
    """Children import the same code as the launcher, installed or not (source checkouts)."""
    env = dict(os.environ)
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
