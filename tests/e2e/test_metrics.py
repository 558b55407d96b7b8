"""Prometheus metrics through real processes: every service started with --metrics-port 0
reports its /metrics address in its ready file, and after a known mix of requests (ok, invalid
at the router, invalid at the encode stage, cancelled mid-stream, rejected) the counts balance:
the router's outcomes add up to what was sent, each stage counted what reached it, the TTFT
histogram counted the ok requests, the encoder's cache hits + misses are the images it encoded."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from epdserve.errors import InvalidArgumentError, ResourceExhaustedError
from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.sdk import Client

pytestmark = pytest.mark.e2e
SERVICES = ("encode", "prefill", "decode", "router")


def _png(seed: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    metrics = ("--metrics-port", "0")
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu", stage_args={name: metrics for name in SERVICES})
    with LocalCluster(config) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def sent(cluster):
    """Send the mix once; returns how many requests of each kind went out."""
    with Client(cluster.router_address, timeout_s=120) as client:
        for seed in (1, 2, 1):  # the repeated image is an encoder cache hit
            client.generate("Describe it", images=[_png(seed)], max_tokens=3, temperature=0.0)
        client.generate("text only", max_tokens=3, temperature=0.0)
        with pytest.raises(InvalidArgumentError):  # refused by the router itself
            client.generate("bad", top_p=1.5, max_tokens=2)
        with pytest.raises(InvalidArgumentError):  # refused by the encode stage
            client.generate("bad image", images=[b"not an image"], max_tokens=2)
        with pytest.raises(ResourceExhaustedError):
            client.generate("x" * ((1 << 20) + 1), max_tokens=1)
        stream = client.stream("cancel me", max_tokens=1500, temperature=0.0, ignore_eos=True)
        for i, _ in enumerate(stream):
            if i == 2:
                stream.cancel()
                break
    return {"ok": 4, "ok_images": 3, "error": 2, "cancelled": 1, "rejected": 1}


def _settled(cluster, check, timeout_s: float = 10.0):
    """Scrape until `check(scrapes)` holds (handlers of a cancelled stream end asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        scrapes = {name: cluster.scrape_metrics(name) for name in SERVICES}
        try:
            check(scrapes)
            return scrapes
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_every_service_reports_its_metrics_address(cluster):
    for name in SERVICES:
        host, port = cluster.metrics_address(name).rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0


def test_router_outcomes_add_up_to_what_was_sent(cluster, sent):
    def check(scrapes):
        router = scrapes["router"]
        for outcome in ("ok", "error", "cancelled", "rejected"):
            assert router.value("epdserve_router_requests_total", outcome=outcome) == sent[outcome], outcome
        assert router.value("epdserve_router_errors_total", code="INVALID_ARGUMENT") == sent["error"]
        assert router.value("epdserve_router_errors_total", code="RESOURCE_EXHAUSTED") == sent["rejected"]
        assert router.value("epdserve_router_requests_in_flight") == 0

    router = _settled(cluster, check)["router"]
    assert router.value("epdserve_router_ttft_seconds_count") == sent["ok"]
    assert router.value("epdserve_router_e2e_seconds_count") == sent["ok"]
    assert router.value("epdserve_router_tpot_seconds_count") <= sent["ok"]
    paths = {labels: v for (name, labels), v in router.items() if name == "epdserve_router_path_total"}
    assert sum(paths.values()) == sent["ok"]
    assert router.value("epdserve_router_path_total", path="E->P->D") == sent["ok_images"]


def test_each_stage_counted_what_reached_it(cluster, sent):
    ok_images, ok = sent["ok_images"], sent["ok"]

    def check(scrapes):
        stage = "epdserve_stage_requests_total"
        encode, prefill, decode = scrapes["encode"], scrapes["prefill"], scrapes["decode"]
        assert encode.value(stage, stage="encode", outcome="ok", code="OK") == ok_images
        assert encode.value(stage, stage="encode", outcome="error", code="INVALID_ARGUMENT") == 1
        # the cancelled stream had its prefill done before the cancel, and was cancelled in decode
        assert prefill.value(stage, stage="prefill", outcome="ok", code="OK") == ok + sent["cancelled"]
        assert decode.value(stage, stage="decode", outcome="ok", code="OK") == ok
        assert decode.value(stage, stage="decode", outcome="cancelled", code="CANCELLED") == sent["cancelled"]
        for name in ("encode", "prefill", "decode"):
            assert scrapes[name].value("epdserve_requests_waiting", stage=name) == 0
            assert scrapes[name].value("epdserve_requests_running", stage=name) == 0
        assert decode.value("epdserve_decode_kv_cache_usage_ratio") == 0.0

    scrapes = _settled(cluster, check)
    encode, prefill, decode = scrapes["encode"], scrapes["prefill"], scrapes["decode"]
    hits, misses = (encode.value(f"epdserve_encode_cache_{kind}_total") for kind in ("hits", "misses"))
    assert hits + misses == ok_images and hits >= 1
    assert encode.value("epdserve_cache_put_bytes_total") > 0  # mmcache's own metrics, same endpoint
    assert prefill.value("epdserve_prefill_prompt_tokens_total") > 0
    assert prefill.value("epdserve_prefill_prefix_hit_tokens_total") >= 0
    assert prefill.value("epdserve_cache_pool_capacity_bytes") > 0
    assert prefill.value("epdserve_cache_reserve_wait_seconds_count") == ok + sent["cancelled"]   # every prompt's KV
    assert decode.value("epdserve_decode_kv_capacity_blocks") > 0
