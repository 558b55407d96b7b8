"""Drain, overload and start-up failure through real processes (zero-work stages with a 200 ms
service time per call / token, so requests last a known time and no model runs).

Drain (SIGTERM to a router): readiness NOT_SERVING within 1 s (liveness stays SERVING), new
requests UNAVAILABLE, every in-flight stream completes, exit 0 well before --drain-timeout-s; a
stuck request holds the exit no longer than the drain timeout; a second signal exits at once.
Overload: past --max-in-flight the router answers RESOURCE_EXHAUSTED with a retry-after hint
(HTTP 429 + Retry-After), admitted requests finish, no stage ever sees more than the cap, and the
router's RSS stays flat under 10x overload. A stage that fails after binding its port exits
non-zero and the port is free again."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epdserve.errors import RETRY_AFTER_METADATA
from epdserve.launcher import ClusterConfig, LocalCluster, _child_env
from epdserve.procutil import spawn, stop_process
from epdserve.v1 import common_pb2, load_pb2, load_pb2_grpc, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.e2e
STEP_S = 0.2
STAGES = ("encode", "prefill", "decode")
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


@pytest.fixture(scope="module")
def stages(tiny_checkpoint):
    zero = ("--zero-work", "--zero-work-delay-ms", str(STEP_S * 1000))
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu",
                           stage_args={"encode": zero, "prefill": zero, "decode": zero})
    with LocalCluster(config) as cluster:
        yield cluster


class Router:
    """A router process of its own over the module's stages (the one under test)."""

    def __init__(self, cluster: LocalCluster, workdir: pathlib.Path, *flags: str) -> None:
        name = f"router-{uuid.uuid4().hex[:6]}"
        self.ready_file, self.log_file = workdir / f"{name}.ready", workdir / f"{name}.log"
        stages = [arg for stage in STAGES for arg in (f"--{stage}", cluster.children[stage].address)]
        with open(self.log_file, "wb") as log:
            self.process = spawn([sys.executable, "-m", "services.router", "--model", str(cluster.config.model_dir),
                                  "--port", "0", "--health-port", "0", "--ready-file", str(self.ready_file),
                                  "--health-interval-s", "0.1", *stages, *flags],
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_child_env())
        self.channel = None
        try:
            deadline = time.monotonic() + 60
            while not self.ready_file.is_file():
                assert self.process.poll() is None and time.monotonic() < deadline, self.log_file.read_text()[-2000:]
                time.sleep(0.05)
            self.ready = json.loads(self.ready_file.read_text())
            self.channel = grpc.insecure_channel(self.ready["address"])
            self.stub = router_pb2_grpc.RouterServiceStub(self.channel)
            self._wait_for_healthy_stages()
        except BaseException:
            self.close()
            raise

    def _wait_for_healthy_stages(self) -> None:
        deadline = time.monotonic() + 20
        while True:  # the first request after start succeeds once every pool has a healthy replica
            try:
                list(self.stub.Generate(_request(max_tokens=1), timeout=10))
                return
            except grpc.RpcError:
                assert time.monotonic() < deadline, self.log_file.read_text()[-2000:]
                time.sleep(0.1)

    def health(self, service: str = ROUTER_SERVICE) -> int:
        """The health port's answer for `service` (the router's name = readiness, "" = liveness)."""
        with grpc.insecure_channel(self.ready["health_address"]) as channel:
            request = health_pb2.HealthCheckRequest(service=service)
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=1).status

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.process.poll() is None:
            stop_process(self.process, timeout_s=5)


@pytest.fixture
def routers(stages, tmp_path):
    started: list[Router] = []

    def start(*flags: str) -> Router:
        started.append(Router(stages, tmp_path, *flags))
        return started[-1]

    yield start
    for router in started:
        router.close()


def _request(max_tokens: int) -> router_pb2.GenerateRequest:
    params = router_pb2.GenerationParams(max_tokens=max_tokens, ignore_eos=True,
                                         sampling=common_pb2.SamplingParams(temperature=0))
    return router_pb2.GenerateRequest(prompt="Hello there.", params=params)


def _stream(stub, max_tokens: int, out: list, timeout_s: float = 60) -> None:
    """Run one Generate to its end; append (status code, completion tokens, finished at)."""
    try:
        responses = list(stub.Generate(_request(max_tokens), timeout=timeout_s))
        out.append((grpc.StatusCode.OK, responses[-1].complete.usage.completion_tokens, time.monotonic()))
    except grpc.RpcError as exc:
        out.append((exc.code(), 0, time.monotonic()))


def _stage_in_flight(stages: LocalCluster) -> dict[str, int]:
    """Calls each stage is running now (from its load report)."""
    counts = {}
    for name in STAGES:
        with grpc.insecure_channel(stages.children[name].address) as channel:
            report = load_pb2_grpc.LoadServiceStub(channel).GetLoad(load_pb2.GetLoadRequest(), timeout=5)
        counts[name] = report.queued_requests + report.running_requests
    return counts


def _background(stub, max_tokens: int, count: int) -> tuple[list[threading.Thread], list]:
    results: list = []
    threads = [threading.Thread(target=_stream, args=(stub, max_tokens, results)) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, results


def test_sigterm_drains_in_flight_streams_refuses_new_ones_and_exits_0(routers):
    router = routers("--drain-timeout-s", "10")
    threads, results = _background(router.stub, 6, 3)   # ~1.4 s each: prefill + 6 tokens
    time.sleep(0.4)
    assert router.health() == health_pb2.HealthCheckResponse.SERVING
    signalled = time.monotonic()
    router.process.send_signal(signal.SIGTERM)
    while router.health() != health_pb2.HealthCheckResponse.NOT_SERVING:
        time.sleep(0.01)
    not_ready_s = time.monotonic() - signalled
    assert router.health("") == health_pb2.HealthCheckResponse.SERVING   # alive while draining
    with grpc.insecure_channel(router.ready["address"]) as fresh:   # on the streams' connection and a new one
        for stub in (router.stub, router_pb2_grpc.RouterServiceStub(fresh)):
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(_request(max_tokens=1), timeout=5))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    for thread in threads:
        thread.join(timeout=30)
    assert [(code, tokens) for code, tokens, _ in results] == [(grpc.StatusCode.OK, 6)] * 3
    assert router.process.wait(timeout=15) == 0
    exit_s = time.monotonic() - signalled
    print(f"drain: NOT_SERVING after {not_ready_s:.3f} s, exit 0 after {exit_s:.2f} s")
    assert not_ready_s < 1.0
    assert exit_s < 4.0, f"exit took {exit_s:.2f} s for streams of ~1.4 s (drain timeout 10 s)"


def test_a_stuck_request_holds_the_exit_no_longer_than_the_drain_timeout(routers, stages):
    router = routers("--drain-timeout-s", "1")
    threads, results = _background(router.stub, 200, 1)  # ~40 s
    time.sleep(0.6)
    signalled = time.monotonic()
    router.process.send_signal(signal.SIGTERM)
    assert router.process.wait(timeout=10) == 0
    exit_s = time.monotonic() - signalled
    threads[0].join(timeout=10)
    (code, _, ended_at), = results
    print(f"stuck request: cut after {ended_at - signalled:.2f} s, exit after {exit_s:.2f} s")
    assert code != grpc.StatusCode.OK and ended_at - signalled >= 0.9   # cut at the drain timeout, not before
    assert 0.9 <= exit_s < 3.0, f"exit {exit_s:.2f} s after SIGTERM with a 1 s drain timeout"
    deadline = time.monotonic() + 2
    while any(_stage_in_flight(stages).values()):   # the cut request's stage calls were cancelled too
        assert time.monotonic() < deadline, "a stage still runs the cut request"
        time.sleep(0.05)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_exits_at_once(routers, second):
    router = routers("--drain-timeout-s", "30")
    threads, _ = _background(router.stub, 200, 1)
    time.sleep(0.6)
    router.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert router.process.poll() is None, "the first signal should drain (30 s), not exit"
    signalled = time.monotonic()
    router.process.send_signal(second)
    code = router.process.wait(timeout=10)
    exit_s = time.monotonic() - signalled
    threads[0].join(timeout=10)
    print(f"second {second.name}: exit {code} after {exit_s:.3f} s")
    assert code == 128 + second and exit_s < 1.0, (code, exit_s)


def _rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _chat(address: str, model: str) -> urllib.request.Request:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    return urllib.request.Request(f"http://{address}/v1/chat/completions", data=body.encode(),
                                  headers={"Content-Type": "application/json"})


CAP = 4


def test_past_the_cap_requests_are_refused_with_a_retry_hint_and_memory_stays_flat(routers, stages):
    router = routers("--max-in-flight", str(CAP), "--http-port", "0")
    held = [router.stub.Generate(_request(max_tokens=100), timeout=60) for _ in range(CAP)]
    time.sleep(0.5)
    with pytest.raises(grpc.RpcError) as refused:
        list(router.stub.Generate(_request(max_tokens=1), timeout=5))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert float(dict(refused.value.trailing_metadata())[RETRY_AFTER_METADATA]) >= 0.5
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(_chat(router.ready["http_address"], stages.config.model_dir.name), timeout=10)
    assert http.value.code == 429 and int(http.value.headers["Retry-After"]) >= 1
    for call in held:
        call.cancel()
    deadline = time.monotonic() + 2
    while any(_stage_in_flight(stages).values()):   # the cancelled calls have left the stages
        assert time.monotonic() < deadline
        time.sleep(0.02)

    # 10x overload: 10 * CAP clients sending back to back (a refused one retries after 20 ms)
    stop, outcomes, peak = threading.Event(), [], [0]

    def client() -> None:
        while not stop.is_set():
            try:
                responses = list(router.stub.Generate(_request(max_tokens=2), timeout=30))
                outcomes.append(("ok", responses[-1].complete.usage.completion_tokens))
            except grpc.RpcError as exc:
                hint = dict(exc.trailing_metadata() or ()).get(RETRY_AFTER_METADATA)
                outcomes.append((exc.code().name, hint is not None))
                time.sleep(0.02)

    clients = [threading.Thread(target=client) for _ in range(10 * CAP)]
    started = time.monotonic()
    for thread in clients:
        thread.start()
    time.sleep(1.0)
    rss_warm = _rss_kib(router.process.pid)
    while time.monotonic() - started < 5.0:
        peak[0] = max(peak[0], *_stage_in_flight(stages).values())
    rss_end = _rss_kib(router.process.pid)
    stop.set()
    for thread in clients:
        thread.join(timeout=30)
    print(f"overload: {len(outcomes)} requests in {time.monotonic() - started:.1f} s, "
          f"RSS {rss_warm / 1024:.1f} -> {rss_end / 1024:.1f} MiB")
    admitted = [o for o in outcomes if o[0] == "ok"]
    refused = [o for o in outcomes if o[0] != "ok"]
    assert set(refused) == {("RESOURCE_EXHAUSTED", True)}, set(refused)
    assert all(tokens == 2 for _, tokens in admitted)
    assert len(admitted) >= 4 * CAP and len(refused) >= len(admitted)
    assert peak[0] <= CAP, f"{peak[0]} requests at one stage with a cap of {CAP}"
    assert rss_end - rss_warm < 8 * 1024, f"router RSS grew {(rss_end - rss_warm) / 1024:.1f} MiB under overload"
    list(router.stub.Generate(_request(max_tokens=1), timeout=10))  # slots are all given back


def test_a_service_that_fails_at_start_exits_non_zero_and_frees_its_port(stages, tmp_path):
    """The decode process binds its port, then cannot create its shared-memory pool."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "services.decode", "--zero-work", "--model",
                           str(stages.config.model_dir), "--port", str(port), "--redis-url", stages.redis_url,
                           "--shm-dir", "/dev/null/not-a-directory", "--ready-file", str(tmp_path / "never.ready")],
                          capture_output=True, text=True, timeout=60, env=_child_env())
    print(f"failed start: exit {done.returncode} after {time.monotonic() - started:.2f} s")
    assert done.returncode != 0 and time.monotonic() - started < 30
    assert not (tmp_path / "never.ready").exists()
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))   # the port is free again
