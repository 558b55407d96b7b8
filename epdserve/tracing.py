"""OpenTelemetry tracing: one trace per request, router -> encode -> prefill -> decode.

Off (the default) it costs nothing: opentelemetry is never imported (it need not be installed),
`span` / `start_span` / `server_span` return the shared `NO_SPAN` and `grpc_metadata` returns None.
On (`setup` from --trace-exporter otlp|file, once per process, before serving), the process has one
TracerProvider (resource: service.name = $OTEL_SERVICE_NAME or epdserve-<stage>, epdserve.stage),
a parent-based ratio sampler (the router decides, stages follow) and a BatchSpanProcessor;
`shutdown` flushes it after the server has drained.

Context crosses processes as a W3C traceparent: in gRPC metadata (`grpc_metadata` on the calling
side, `server_span` / `caller_span` on the serving side) and, where an event's reader needs it, as
a field of a mmcache readiness event (`inject` / `remote_span`). Spans are made current only around
code that does not `yield` (`span`); in async generators, which may be finished from another task,
spans get an explicit parent and are ended by their owner (`start_span` / `end_span`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from epdserve.errors import FailedPreconditionError

if TYPE_CHECKING:
    from epdserve.config import TraceConfig
    from epdserve.env import Env

DEFAULT_OTLP_ENDPOINT = "http://localhost:4317"


class NoSpan:
    """What the helpers return while tracing is off: takes the Span calls used in epdserve (and
    works as a context manager), records nothing."""

    __slots__ = ()

    def __enter__(self) -> NoSpan:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def is_recording(self) -> bool:
        return False

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        pass

    def end(self) -> None:
        pass


NO_SPAN = NoSpan()


@dataclasses.dataclass(frozen=True)
class _Active:
    provider: Any     # opentelemetry.sdk.trace.TracerProvider
    tracer: Any
    propagator: Any   # TraceContextTextMapPropagator
    api: Any          # the opentelemetry.trace module
    closing: tuple    # files to close after the provider's last export


_active: _Active | None = None  # the process's tracing once `setup` turned it on; None = off


def enabled() -> bool:
    return _active is not None


def setup(config: TraceConfig, stage: str, env: Env, *, exporter=None) -> None:
    """Turn tracing on for this process as `config` says (nothing when its exporter is none).
    `exporter` (a SpanExporter, e.g. the SDK's InMemorySpanExporter in tests) replaces the
    configured one; a previous setup is flushed and replaced. Raises FailedPreconditionError when
    the OpenTelemetry packages are missing."""
    global _active
    shutdown()
    if not config.enabled and exporter is None:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        raise FailedPreconditionError("tracing needs the OpenTelemetry SDK: pip install opentelemetry-sdk") from None
    closing: tuple = ()
    if exporter is None:
        exporter, closing = _exporter(config, env)
    resource = Resource.create({"service.name": env.otel_service_name or f"epdserve-{stage}", "epdserve.stage": stage})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.trace_sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _active = _Active(provider, provider.get_tracer("epdserve"), TraceContextTextMapPropagator(), trace, closing)


def shutdown() -> None:
    """Export what is left and turn tracing off (idempotent)."""
    global _active
    active, _active = _active, None
    if active is not None:
        active.provider.shutdown()
        for file in active.closing:
            file.close()


def _exporter(config: TraceConfig, env: Env) -> tuple[Any, tuple]:
    if config.trace_exporter == "file":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # line-buffered append: one write per span, so several processes can share the file
        out = open(config.trace_file, "a", buffering=1, encoding="utf-8")  # closed by shutdown()
        return ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n"), (out,)
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise FailedPreconditionError("--trace-exporter otlp needs the OTLP exporter: "
                                      "pip install 'epdserve[otlp]'") from None
    return OTLPSpanExporter(endpoint=config.trace_endpoint or env.otlp_endpoint or DEFAULT_OTLP_ENDPOINT), ()


# ---- spans -------------------------------------------------------------------------------------------


def span(name: str, attributes: Mapping[str, Any] | None = None, *, parent=None, kind: str = "internal"):
    """Context manager yielding a span that is current inside the block: a child of `parent` (a
    span; None = the current one), ended at the block's end with any exception recorded. Never
    around a `yield` of an async generator (use `detached_span`)."""
    if _active is None:
        return NO_SPAN
    return _active.tracer.start_as_current_span(name, context=_context(parent), kind=_kind(kind),
                                                attributes=attributes)


def detached_span(name: str, attributes: Mapping[str, Any] | None = None, *, parent=None, kind: str = "internal"):
    """Context manager yielding a span that is not made current (safe around the `yield`s of an
    async generator): a child of `parent` (None = the current span), ended at the block's end with
    any exception recorded (a cancellation or a closed generator noted, not an error)."""
    if _active is None:
        return NO_SPAN
    return _ending(start_span(name, attributes, parent=parent, kind=kind))


@contextlib.contextmanager
def _ending(span):
    try:
        yield span
    except BaseException as exc:
        end_span(span, exc)
        raise
    end_span(span)


def start_span(name: str, attributes: Mapping[str, Any] | None = None, *, parent=None, kind: str = "internal"):
    """A span that is not made current: a child of `parent` (None = the current span); the caller
    ends it with `end_span`."""
    if _active is None:
        return NO_SPAN
    return _active.tracer.start_span(name, context=_context(parent), kind=_kind(kind), attributes=attributes)


def use(span):
    """Context manager making `span` (from `start_span`) current inside the block, without ending
    it, e.g. for the task that does a request's work."""
    if _active is None or isinstance(span, NoSpan):
        return NO_SPAN
    return _active.api.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False)


def end_span(span, error: BaseException | None = None, attributes: Mapping[str, Any] | None = None) -> None:
    """Set `attributes`, record `error` (a cancellation is noted, not an error), end the span."""
    if _active is None or not span.is_recording():
        span.end()
        return
    if attributes:
        span.set_attributes(attributes)
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        span.set_attribute("epdserve.cancelled", True)
    elif error is not None:
        from opentelemetry.trace import Status, StatusCode

        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()


def server_span(name: str, grpc_context, attributes: Mapping[str, Any] | None = None):
    """Context manager for a unary RPC handler: a SERVER span, current inside the block, whose
    parent is the caller's (traceparent in the call's metadata)."""
    if _active is None:
        return NO_SPAN
    return span(name, attributes, parent=caller_span(grpc_context), kind="server")


def trace_id(span) -> str:
    """The span's trace id as 32 hex digits when it is sampled (recorded somewhere); else ""."""
    if _active is None:
        return ""
    context = span.get_span_context()
    return _active.api.format_trace_id(context.trace_id) if context.trace_flags.sampled else ""


def _context(parent):
    if parent is None or isinstance(parent, NoSpan):
        return None
    return _active.api.set_span_in_context(parent)


def _kind(kind: str):
    return {"internal": _active.api.SpanKind.INTERNAL, "server": _active.api.SpanKind.SERVER,
            "client": _active.api.SpanKind.CLIENT}[kind]


# ---- propagation -------------------------------------------------------------------------------------


def grpc_metadata(span=None) -> tuple[tuple[str, str], ...] | None:
    """Metadata for an outgoing gRPC call that carries `span`'s context (None = the current span);
    None while tracing is off."""
    if _active is None:
        return None
    return tuple(inject({}, span).items()) or None


def inject(carrier: dict[str, str], span=None) -> dict[str, str]:
    """Add the traceparent (and tracestate) of `span` (None = the current span) to `carrier`, e.g.
    a readiness event's fields; returns the carrier (unchanged while tracing is off)."""
    if _active is not None:
        _active.propagator.inject(carrier, context=_context(span))
    return carrier


def remote_span(carrier: Mapping[str, str]):
    """The span a traceparent in `carrier` names (gRPC metadata as a mapping, a readiness event),
    to use as a parent; None when there is none or tracing is off."""
    if _active is None:
        return None
    found = _active.api.get_current_span(_active.propagator.extract(carrier))
    return found if found.get_span_context().is_valid else None


def caller_span(grpc_context):
    """The calling side's span of an RPC being served (from its metadata), or None."""
    if _active is None:
        return None
    return remote_span(dict(grpc_context.invocation_metadata() or ()))
