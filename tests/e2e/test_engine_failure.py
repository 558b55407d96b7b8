"""A replica whose model engine fails for good (a GPU that faults on every call, injected with
--inject-model-fault-after) reports NOT_SERVING, ends its streams with a clear error and exits 1
(so Kubernetes restarts it) once --engine-failures-fatal calls in a row failed; the router places
work on the healthy replicas, no request hangs, and afterwards every request succeeds. Real
processes, two prefill and two decode replicas, one of each faulty."""

from __future__ import annotations

import concurrent.futures
import subprocess
import time

import pytest

from epdserve.errors import EpdserveError
from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.sdk import Client

pytestmark = pytest.mark.e2e

FAULT_AFTER = {"prefill-1": 6, "decode-1": 30}  # model calls each serves before its "GPU" fails
FATAL_AFTER = 3  # --engine-failures-fatal default
CLIENTS, PER_CLIENT, WALL_BOUND_S = 4, 8, 60.0
MAX_ROUNDS = 4  # of CLIENTS x PER_CLIENT requests: until each faulty replica has failed its calls


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    faults = {name: ("--inject-model-fault-after", str(n)) for name, n in FAULT_AFTER.items()}
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu", replicas={"prefill": 2, "decode": 2},
                           stage_args={"router": ("--health-interval-s", "0.2"), **faults})
    with LocalCluster(config) as cluster:
        yield cluster


def _one(address: str, index: int) -> str:
    """'ok', or the gRPC code name of a clear error; raises if the call takes too long."""
    start = time.monotonic()
    with Client(address, timeout_s=WALL_BOUND_S) as client:
        try:
            result = client.generate(f"request {index}: tell me about the sea", max_tokens=8, ignore_eos=True,
                                     temperature=0.0)
            outcome = "ok" if result.usage.completion_tokens == 8 else f"short:{result.usage.completion_tokens}"
        except EpdserveError as exc:
            outcome = exc.code
    assert time.monotonic() - start < WALL_BOUND_S, f"request {index} took too long"
    return outcome


def _exited(cluster, name: str, within_s: float) -> bool:
    try:
        cluster.children[name].process.wait(timeout=within_s)
        return True
    except subprocess.TimeoutExpired:
        return False


def _traffic(address: str, first: int) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(lambda i: _one(address, i), range(first, first + CLIENTS * PER_CLIENT)))


def test_failed_engines_exit_1_and_the_router_serves_on(cluster):
    outcomes: list[str] = []
    for round_ in range(MAX_ROUNDS):  # how many calls reach each replica is the router's choice
        started = time.monotonic()
        outcomes += _traffic(cluster.router_address, round_ * CLIENTS * PER_CLIENT)
        assert time.monotonic() - started < WALL_BOUND_S * 2
        if all(_exited(cluster, name, within_s=5.0) for name in FAULT_AFTER):
            break
    errors = [o for o in outcomes if o != "ok"]
    # what may fail: the requests of each failed call before the engine is declared failed (INTERNAL,
    # not retried, so one bad request cannot take down every replica in turn): one per prefill call,
    # a batch (<= one per client) per decode step; after that, only streams already producing on the
    # failed decode replica; everything else is re-sent to the healthy replica (UNAVAILABLE there)
    assert len(errors) <= FATAL_AFTER + CLIENTS and set(errors) <= {"UNAVAILABLE", "INTERNAL"}, outcomes
    for name in FAULT_AFTER:
        process = cluster.children[name].process
        try:
            code = process.wait(timeout=30)
        except Exception:
            pytest.fail(f"{name} did not exit after its engine failed:\n{cluster.log_tail(name)}")
        assert code == 1, cluster.log_tail(name)
        log = cluster.log_tail(name, 200)
        assert "model engine failed" in log and "injected model fault" in log
    assert all(o == "ok" for o in _traffic(cluster.router_address, 1000))  # only the healthy replicas are left
    for name in ("prefill", "decode", "encode"):
        assert cluster.children[name].process.poll() is None, f"{name} died:\n{cluster.log_tail(name)}"
