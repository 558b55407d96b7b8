"""E+P colocated, end to end: prefill processes that also serve EncodeService (`--with-encode`)
behind a router started with `--encode-colocated`, real processes on loopback, the tiny checkpoint.
Lossless output equals transformers; every image request is encoded and prefilled on one replica;
the load service reports each stage separately and refuses a stage the replica does not serve."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epdserve.config import RouterConfig
from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.sdk import Client
from epdserve.v1 import load_pb2, load_pb2_grpc

pytestmark = pytest.mark.e2e
METRICS = ("--metrics-port", "0")


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu", encode_colocated=True,
                           replicas={"prefill": 2}, stage_args={"prefill": METRICS, "decode": METRICS,
                                                                "encode": ("--max-batch-size", "4")})
    with LocalCluster(config) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout_s=120) as client:
        yield client


def test_no_encode_process_runs(cluster):
    assert sorted(cluster.children) == ["decode", "prefill", "prefill-1", "router"]


def test_greedy_generation_equals_transformers(client, tiny_checkpoint, hf_greedy, random_png):
    images = [random_png(1), random_png(2, (20, 64))]
    result = client.generate("What is in these pictures?", images=images, max_tokens=12, temperature=0.0,
                             ignore_eos=True)
    assert list(result.token_ids) == hf_greedy(tiny_checkpoint, "What is in these pictures?", images, 12)
    assert result.timings_ms["encode_replicas"] == 1   # both images on the one replica chosen for the request
    text = client.generate("Hello!", max_tokens=6, temperature=0.0, ignore_eos=True)
    assert list(text.token_ids) == hf_greedy(tiny_checkpoint, "Hello!", [], 6)


def test_each_image_request_is_encoded_where_it_is_prefilled(cluster, client, random_png):
    before = {name: _stage_counts(cluster, name) for name in ("prefill", "prefill-1")}
    for seed in range(10, 16):
        client.generate("Describe it", images=[random_png(seed), random_png(seed + 100)], max_tokens=2, temperature=0.0)
    after = {name: _stage_counts(cluster, name) for name in ("prefill", "prefill-1")}
    served = {name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in after}
    assert sum(encoded for encoded, _ in served.values()) == 6
    for name, (encoded, prefilled) in served.items():
        assert encoded == prefilled, (name, served)   # one Encode call per request, on its prefill replica
    assert cluster.scrape_metrics("prefill").value("epdserve_encode_cache_misses_total") > 0


def _stage_counts(cluster, name: str) -> tuple[float, float]:
    samples = cluster.scrape_metrics(name)
    return tuple(samples.value("epdserve_stage_requests_total", stage=stage, outcome="ok", code="OK")
                 for stage in ("encode", "prefill"))


def test_load_reports_per_stage_and_a_stage_not_served_is_not_found(cluster):
    with grpc.insecure_channel(cluster.children["prefill"].address) as channel:
        load = load_pb2_grpc.LoadServiceStub(channel)
        assert load.GetLoad(load_pb2.GetLoadRequest(), timeout=5).stage == "prefill"
        assert load.GetLoad(load_pb2.GetLoadRequest(stage="encode"), timeout=5).stage == "encode"
        with pytest.raises(grpc.RpcError) as err:
            load.GetLoad(load_pb2.GetLoadRequest(stage="decode"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "serves prefill, encode, not 'decode'" in err.value.details()
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="epdserve.v1.EncodeService"), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(cluster.children["decode"].address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            load_pb2_grpc.LoadServiceStub(channel).GetLoad(load_pb2.GetLoadRequest(stage="encode"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_router_refuses_encode_addresses_when_colocated():
    with pytest.raises(ValueError, match="give no --encode address"):
        RouterConfig(encode=("127.0.0.1:1",), prefill=("127.0.0.1:2",), decode=("127.0.0.1:3",), encode_colocated=True)
    with pytest.raises(ValueError, match="at least one --encode address"):
        RouterConfig(prefill=("127.0.0.1:2",), decode=("127.0.0.1:3",))
    RouterConfig(prefill=("127.0.0.1:2",), decode=("127.0.0.1:3",), encode_colocated=True)


@pytest.fixture(scope="module")
def aggregated(tiny_checkpoint):
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu", encode_colocated=True, replicas={"prefill": 0},
                           stage_args={"decode": METRICS})
    with LocalCluster(config) as cluster:
        yield cluster


def test_aggregated_serves_every_stage_in_the_decode_process(aggregated, tiny_checkpoint, hf_greedy, random_png):
    assert sorted(aggregated.children) == ["decode", "router"]
    with Client(aggregated.router_address, timeout_s=120) as client:
        images = [random_png(1), random_png(2, (20, 64))]
        result = client.generate("What is in these pictures?", images=images, max_tokens=12, temperature=0.0,
                                 ignore_eos=True)
        assert list(result.token_ids) == hf_greedy(tiny_checkpoint, "What is in these pictures?", images, 12)
        assert result.timings_ms["local_prefill"] == 1.0
        text = client.generate("Hello!", max_tokens=6, temperature=0.0, ignore_eos=True)
        assert list(text.token_ids) == hf_greedy(tiny_checkpoint, "Hello!", [], 6)
    samples = aggregated.scrape_metrics("decode")
    assert samples.value("epdserve_stage_requests_total", stage="encode", outcome="ok", code="OK") == 1
    assert samples.value("epdserve_stage_requests_total", stage="decode", outcome="ok", code="OK") == 2


def test_a_stage_with_no_replicas_is_refused():
    with pytest.raises(ValueError, match="prefill needs at least 1"):
        ClusterConfig(model_dir="m", replicas={"prefill": 0})
    with pytest.raises(ValueError, match="decode needs at least 1"):
        ClusterConfig(model_dir="m", encode_colocated=True, replicas={"decode": 0})
    with pytest.raises(ValueError, match="need prefill replicas"):
        RouterConfig(decode=("127.0.0.1:3",), encode_colocated=True, slo_ttft_s=2.0)
