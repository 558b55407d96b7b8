"""The pure parts of the metrics: how a request's end maps to (outcome, code), the router's
per-request record (counts, histograms, path, log line without prompt text), the stage counters
fed by LoadTracker and the scrape-time gauges."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from epdserve.config import ServerConfig
from epdserve.errors import DeadlineExceededError, InvalidArgumentError, ResourceExhaustedError
from services.load import LoadTracker
from services.metrics import StageMetrics, outcome_of, registry_collector
from services.router.metrics import RouterMetrics
from services.router.orchestrator import Finished

pytestmark = pytest.mark.unit


def _value(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("exc,expected", [
    (None, ("ok", "OK")),
    (asyncio.CancelledError(), ("cancelled", "CANCELLED")),
    (GeneratorExit(), ("cancelled", "CANCELLED")),
    (InvalidArgumentError("x"), ("error", "INVALID_ARGUMENT")),
    (ResourceExhaustedError("x"), ("rejected", "RESOURCE_EXHAUSTED")),
    (DeadlineExceededError("x"), ("error", "DEADLINE_EXCEEDED")),
    (RuntimeError("boom"), ("error", "INTERNAL")),
])
def test_outcome_of(exc, expected):
    assert outcome_of(exc, rejected_codes=("RESOURCE_EXHAUSTED",)) == expected


def test_resource_exhausted_is_an_error_unless_asked():
    assert outcome_of(ResourceExhaustedError("x")) == ("error", "RESOURCE_EXHAUSTED")


def _finished(reason="length", local=0.0):
    return Finished(reason, 7, 0, 3, {"local_prefill": local})


def test_router_record_counts_an_ok_request_once(caplog):
    metrics = RouterMetrics()
    record = metrics.begin()
    record.request_id, record.images = "r1", 1
    assert _value(metrics.registry, "epdserve_router_requests_in_flight") == 1
    record.chunk(1)
    record.chunk(2)
    record.finished(_finished())
    with caplog.at_level(logging.INFO, logger="epdserve.router.requests"):
        assert record.end(None) == ("ok", "OK")
    r = metrics.registry
    assert _value(r, "epdserve_router_requests_total", outcome="ok") == 1
    assert _value(r, "epdserve_router_requests_total", outcome="error") == 0
    assert _value(r, "epdserve_router_requests_in_flight") == 0
    assert _value(r, "epdserve_router_ttft_seconds_count") == 1
    assert _value(r, "epdserve_router_tpot_seconds_count") == 1
    assert _value(r, "epdserve_router_e2e_seconds_count") == 1
    assert _value(r, "epdserve_router_path_total", path="E->P->D") == 1
    assert _value(r, "epdserve_router_completion_tokens_total") == 3
    assert _value(r, "epdserve_router_prompt_tokens_total") == 7
    line = caplog.records[-1].getMessage()
    assert "id=r1" in line and "outcome=ok" in line and "path=E->P->D" in line and "completion_tokens=3" in line


@pytest.mark.parametrize("feed,exc,outcome,code", [
    (lambda rec: None, InvalidArgumentError("bad"), "error", "INVALID_ARGUMENT"),
    (lambda rec: None, ResourceExhaustedError("busy"), "rejected", "RESOURCE_EXHAUSTED"),
    (lambda rec: rec.chunk(1), GeneratorExit(), "cancelled", "CANCELLED"),
    (lambda rec: rec.finished(_finished("abort")), None, "cancelled", "CANCELLED"),
    (lambda rec: (rec.chunk(1), rec.failed("UNAVAILABLE")), None, "error", "UNAVAILABLE"),
])
def test_router_record_outcomes(feed, exc, outcome, code):
    metrics = RouterMetrics()
    record = metrics.begin()
    feed(record)
    assert record.end(exc) == (outcome, code)
    r = metrics.registry
    assert _value(r, "epdserve_router_requests_total", outcome=outcome) == 1
    assert _value(r, "epdserve_router_errors_total", code=code) == (outcome in ("error", "rejected"))
    assert _value(r, "epdserve_router_ttft_seconds_count") == 0  # latency histograms: ok requests only


def test_router_paths():
    for images, local, path in ((0, 0.0, "P->D"), (0, 1.0, "PD"), (2, 1.0, "E->PD")):
        metrics = RouterMetrics()
        record = metrics.begin()
        record.images = images
        record.finished(_finished(local=local))
        record.end(None)
        assert _value(metrics.registry, "epdserve_router_path_total", path=path) == 1


def test_stage_metrics_count_each_request_and_read_the_tracker_at_scrape_time():
    registry, load = CollectorRegistry(), LoadTracker("prefill", "p0")
    StageMetrics(registry, load)
    with load.request(5):
        assert _value(registry, "epdserve_requests_waiting", stage="prefill") == 1
        load.running(5, lambda: None)()
    with pytest.raises(InvalidArgumentError), load.request(1):
        raise InvalidArgumentError("bad")
    assert _value(registry, "epdserve_stage_requests_total", stage="prefill", outcome="ok", code="OK") == 1
    assert _value(registry, "epdserve_stage_requests_total", stage="prefill", outcome="error",
                  code="INVALID_ARGUMENT") == 1
    assert _value(registry, "epdserve_requests_waiting", stage="prefill") == 0
    assert _value(registry, "epdserve_requests_running", stage="prefill") == 0


def test_colocated_stages_count_under_their_own_labels():
    registry, prefill, encode = CollectorRegistry(), LoadTracker("prefill", "p0"), LoadTracker("encode", "p0")
    StageMetrics(registry, prefill, encode)
    with encode.request(2):
        assert _value(registry, "epdserve_requests_waiting", stage="encode") == 1
        assert _value(registry, "epdserve_requests_waiting", stage="prefill") == 0
    with prefill.request(7):
        pass
    with prefill.request(7):
        pass
    assert _value(registry, "epdserve_stage_requests_total", stage="encode", outcome="ok", code="OK") == 1
    assert _value(registry, "epdserve_stage_requests_total", stage="prefill", outcome="ok", code="OK") == 2
    from prometheus_client.exposition import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    text = generate_latest(registry).decode()
    assert text.count("# TYPE epdserve_requests_waiting gauge") == 1
    families = {f.name: f for f in text_string_to_metric_families(openmetrics_latest(registry).decode())}
    assert {s.labels["stage"] for s in families["epdserve_requests_waiting"].samples} == {"prefill", "encode"}


def test_another_registry_is_served_through_this_one():
    from mmcache.metrics import CacheMetrics

    registry, cache = CollectorRegistry(), CacheMetrics()
    registry.register(registry_collector(cache.registry))
    cache.bytes_put.inc(10)
    assert _value(registry, "epdserve_cache_put_bytes_total") == 10


@pytest.mark.parametrize("port", [-2, 65536])
def test_metrics_port_is_checked(port):
    with pytest.raises(ValueError, match="metrics_port"):
        ServerConfig(metrics_port=port)
