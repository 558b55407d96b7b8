"""OpenTelemetry tracing through real processes: every service writes its spans to one JSON-lines
file (--trace-exporter file); one image+text request through the router makes exactly one trace
that holds spans of all four services, whose parent links all resolve inside it, whose mmcache
spans carry bytes, and whose id is in the router's log line. With tracing off the services never
import opentelemetry (a package of that name that fails on import is put on their path) and write
no span file."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from epdserve.config import TraceConfig
from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.sdk import Client

pytestmark = pytest.mark.e2e
SERVICES = {"router", "encode", "prefill", "decode"}
REQUEST_ID = "traced-1"


def _png(seed: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _run_one_request(config: ClusterConfig) -> tuple[dict[str, int | None], str]:
    """Start the cluster, send one image+text request, stop it (flushing every service's spans);
    returns the exit codes and the router's log."""
    cluster = LocalCluster(config)
    try:
        cluster.start()
        with Client(cluster.router_address, timeout_s=120) as client:
            result = client.generate("Describe it", images=[_png(1)], max_tokens=4, temperature=0.0,
                                     ignore_eos=True, request_id=REQUEST_ID)
        assert result.usage.completion_tokens == 4
        router_log = cluster.log_tail("router", lines=500)
    finally:
        codes = cluster.stop()
    return codes, router_log


@pytest.fixture(scope="module")
def traced(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "spans.jsonl"
    trace = TraceConfig(trace_exporter="file", trace_file=str(path))
    codes, router_log = _run_one_request(ClusterConfig(model_dir=tiny_checkpoint, device="cpu", log_level="INFO",
                                                       trace=trace))
    assert all(code == 0 for code in codes.values()), codes
    return [json.loads(line) for line in path.read_text().splitlines()], router_log


def _trace_of_request(spans: list[dict]) -> tuple[dict, list[dict]]:
    (root,) = [s for s in spans if s["name"] == "epdserve.request"
               and s["attributes"].get("epdserve.request_id") == REQUEST_ID]
    trace_id = root["context"]["trace_id"]
    return root, [s for s in spans if s["context"]["trace_id"] == trace_id]


def test_one_trace_spans_all_four_services(traced):
    spans, _ = traced
    root, trace = _trace_of_request(spans)
    assert {s["resource"]["attributes"]["epdserve.stage"] for s in trace} == SERVICES
    assert {s["resource"]["attributes"]["service.name"] for s in trace} == {f"epdserve-{n}" for n in SERVICES}
    names = {s["name"] for s in trace}
    assert names >= {"router.placement", "router.encode", "router.prefill", "router.decode",
                     "encode.Encode", "encode.cache_lookup", "encode.tower",
                     "prefill.Prefill", "prefill.fetch_inputs", "prefill.forward", "prefill.kv_publish",
                     "decode.Decode", "decode.kv_pull", "decode.queue", "decode.stream",
                     "mmcache.put", "mmcache.get"}, names
    assert root["attributes"]["epdserve.outcome"] == "ok"
    assert root["attributes"]["epdserve.path"] == "E->P->D"
    assert root["attributes"]["epdserve.completion_tokens"] == 4
    assert [e["name"] for e in root["events"]] == ["first_token"]


def test_parent_links_resolve_inside_the_trace(traced):
    spans, _ = traced
    root, trace = _trace_of_request(spans)
    ids = {s["context"]["span_id"] for s in trace}
    assert len(ids) == len(trace)
    assert [s["name"] for s in trace if s["parent_id"] is None] == ["epdserve.request"]
    assert all(s["parent_id"] in ids for s in trace if s is not root)
    by_id = {s["context"]["span_id"]: s for s in trace}
    for name, parent in (("encode.Encode", "router.encode"), ("prefill.Prefill", "router.prefill"),
                         ("decode.Decode", "router.decode"), ("decode.kv_pull", "decode.Decode"),
                         ("router.prefill", "epdserve.request")):
        (span,) = [s for s in trace if s["name"] == name]
        assert by_id[span["parent_id"]]["name"] == parent, name


def test_mmcache_spans_carry_bytes_and_tier(traced):
    spans, _ = traced
    _, trace = _trace_of_request(spans)
    cache_spans = [s for s in trace if s["name"] in ("mmcache.put", "mmcache.get")]
    stages = {(s["name"], s["resource"]["attributes"]["epdserve.stage"]) for s in cache_spans}
    assert stages >= {("mmcache.put", "encode"), ("mmcache.put", "prefill"), ("mmcache.get", "prefill"),
                      ("mmcache.get", "decode")}
    assert all(s["attributes"]["mmcache.bytes"] > 0 and s["attributes"]["mmcache.tier"] == "host" for s in cache_spans)


def test_the_router_logs_the_requests_trace_id(traced):
    spans, router_log = traced
    root, _ = _trace_of_request(spans)
    (line,) = [line for line in router_log.splitlines() if f"id={REQUEST_ID} " in line]
    assert f"trace_id={root['context']['trace_id'].removeprefix('0x')} " in line


def test_with_tracing_off_nothing_is_imported_or_written(tiny_checkpoint, tmp_path, monkeypatch):
    poisoned = tmp_path / "path" / "opentelemetry"
    poisoned.mkdir(parents=True)
    (poisoned / "__init__.py").write_text("raise ImportError('tracing is off: opentelemetry must not be imported')\n")
    monkeypatch.setenv("PYTHONPATH", str(poisoned.parent))
    monkeypatch.chdir(tmp_path)
    codes, router_log = _run_one_request(ClusterConfig(model_dir=tiny_checkpoint, device="cpu", log_level="INFO"))
    assert all(code == 0 for code in codes.values()), codes
    assert f"id={REQUEST_ID} trace_id=- outcome=ok" in router_log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["path"]
