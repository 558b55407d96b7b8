"""Tracing helpers: off costs nothing and records nothing; on, a span's context travels through
gRPC metadata (and a readiness event's fields) and the serving side's spans join its trace."""

from __future__ import annotations

import json

import pytest

from epdserve import tracing
from epdserve.config import TraceConfig
from epdserve.env import read_env

pytestmark = pytest.mark.unit


class _ServicerContext:
    """The part of grpc.aio.ServicerContext the helpers read."""

    def __init__(self, metadata) -> None:
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata


@pytest.fixture
def spans():
    """Tracing on with the SDK's in-memory exporter; yields a function returning the finished spans."""
    memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    exporter = memory.InMemorySpanExporter()
    tracing.setup(TraceConfig(), "router", read_env({}), exporter=exporter)

    def finished():
        tracing.shutdown()
        return {s.name: s for s in exporter.get_finished_spans()}

    yield finished
    tracing.shutdown()


def test_off_helpers_return_the_no_op_span_and_no_metadata():
    assert not tracing.enabled()
    with tracing.span("x", {"a": 1}) as span:
        span.set_attribute("b", 2)
        span.add_event("first_token")
    assert span is tracing.NO_SPAN and not span.is_recording()
    assert tracing.start_span("y") is tracing.NO_SPAN
    assert tracing.server_span("z", _ServicerContext(None)) is tracing.NO_SPAN
    assert tracing.grpc_metadata() is None
    assert tracing.inject({"layer": "0"}) == {"layer": "0"}
    assert tracing.remote_span({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) is None
    assert tracing.trace_id(span) == ""
    tracing.end_span(span, ValueError("ignored"))


def test_the_no_op_span_mirrors_opentelemetry_span_methods():
    api = pytest.importorskip("opentelemetry.trace")
    methods = {name for name in dir(tracing.NoSpan) if not name.startswith("_")}
    assert methods and all(callable(getattr(api.Span, name, None)) for name in methods), methods


def test_metadata_inject_extract_joins_the_callers_trace(spans):
    root = tracing.start_span("epdserve.request", kind="server")
    metadata = tracing.grpc_metadata(root)
    assert [key for key, _ in metadata] == ["traceparent"]
    with tracing.server_span("encode.Encode", _ServicerContext(metadata)):
        with tracing.span("encode.tower"):
            pass
    tracing.end_span(root, attributes={"epdserve.outcome": "ok"})
    trace_id = tracing.trace_id(root)
    got = spans()
    assert len(trace_id) == 32
    assert {format(s.context.trace_id, "032x") for s in got.values()} == {trace_id}
    assert got["encode.Encode"].parent.span_id == got["epdserve.request"].context.span_id
    assert got["encode.Encode"].parent.is_remote
    assert got["encode.tower"].parent.span_id == got["encode.Encode"].context.span_id
    assert got["epdserve.request"].attributes["epdserve.outcome"] == "ok"
    assert got["epdserve.request"].resource.attributes["service.name"] == "epdserve-router"


def test_current_span_is_the_default_parent_and_readiness_fields_carry_it(spans):
    with tracing.span("prefill.kv_publish") as publish:
        event = tracing.inject({"layer": "3"})
        assert tracing.grpc_metadata() == (("traceparent", event["traceparent"]),)
    follower = tracing.start_span("decode.kv_pull", parent=tracing.remote_span(event))
    tracing.end_span(follower)
    from multidict import CIMultiDict  # HTTP headers (aiohttp): names are case-insensitive

    headers = tracing.remote_span(CIMultiDict({"Traceparent": event["traceparent"]}))
    assert headers.get_span_context().span_id == publish.get_span_context().span_id
    got = spans()
    assert got["decode.kv_pull"].parent.span_id == publish.get_span_context().span_id


def test_a_server_span_without_a_caller_starts_its_own_trace(spans):
    with tracing.server_span("decode.Decode", _ServicerContext(())) as span:
        pass
    assert tracing.caller_span(_ServicerContext(None)) is None
    assert spans()["decode.Decode"].parent is None and span.is_recording() is False  # ended


def test_errors_are_recorded_and_cancellation_is_not_an_error(spans):
    import asyncio

    failed, cancelled = tracing.start_span("failed"), tracing.start_span("cancelled")
    tracing.end_span(failed, ValueError("boom"))
    tracing.end_span(cancelled, asyncio.CancelledError())
    got = spans()
    assert got["failed"].status.status_code.name == "ERROR"
    assert got["failed"].events[0].name == "exception"
    assert got["cancelled"].status.status_code.name == "UNSET"
    assert got["cancelled"].attributes["epdserve.cancelled"] is True


def test_unsampled_requests_log_no_trace_id_and_stages_follow_the_decision():
    memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    exporter = memory.InMemorySpanExporter()
    tracing.setup(TraceConfig(trace_sample_ratio=0.0), "router", read_env({}), exporter=exporter)
    try:
        root = tracing.start_span("epdserve.request")
        assert tracing.trace_id(root) == ""
        with tracing.server_span("encode.Encode", _ServicerContext(tracing.grpc_metadata(root))) as child:
            assert not child.is_recording()
        tracing.end_span(root)
    finally:
        tracing.shutdown()
    assert exporter.get_finished_spans() == ()


def test_file_exporter_appends_one_json_object_per_line(tmp_path):
    pytest.importorskip("opentelemetry.sdk")
    path = tmp_path / "spans.jsonl"
    path.write_text('{"name": "from another process"}\n')
    tracing.setup(TraceConfig(trace_exporter="file", trace_file=str(path)), "encode",
                  read_env({"OTEL_SERVICE_NAME": "my-encoder"}))
    with tracing.span("encode.Encode", {"epdserve.images": 2}):
        pass
    tracing.shutdown()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"name": "from another process"}
    assert lines[1]["name"] == "encode.Encode" and lines[1]["attributes"] == {"epdserve.images": 2}
    assert lines[1]["resource"]["attributes"]["service.name"] == "my-encoder"
    assert lines[1]["resource"]["attributes"]["epdserve.stage"] == "encode"


def test_trace_config_rejects_contradictions():
    with pytest.raises(ValueError, match="trace_exporter"):
        TraceConfig(trace_exporter="jaeger")
    with pytest.raises(ValueError, match="trace_file"):
        TraceConfig(trace_exporter="file")
    with pytest.raises(ValueError, match="trace_file"):
        TraceConfig(trace_file="spans.jsonl")
    with pytest.raises(ValueError, match="trace_endpoint"):
        TraceConfig(trace_endpoint="http://collector:4317")
    with pytest.raises(ValueError, match="trace_sample_ratio"):
        TraceConfig(trace_exporter="otlp", trace_sample_ratio=1.5)
    assert not TraceConfig().enabled and TraceConfig(trace_exporter="otlp").enabled


def test_otlp_endpoint_comes_from_the_flag_then_the_standard_env_vars():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    env = read_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert env.otlp_endpoint == "http://collector:4317"
    traces_first = read_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317",
                             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4317"})
    assert traces_first.otlp_endpoint == "http://b:4317"
    exporter, closing = tracing._exporter(TraceConfig(trace_exporter="otlp"), env)
    assert closing == () and exporter._endpoint == "collector:4317"
    exporter.shutdown()
