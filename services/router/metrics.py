"""The router's Prometheus metrics and its per-request log line.

One `RequestRecord` per request through `RouterServicer.events` (both front doors, batch jobs):
fed each event as it is yielded, ended once with how the request ended. Outcomes: ok, error
(invalid input, stage failures, deadline: code in `epdserve_router_errors_total{code}`),
cancelled (Abort, client gone), rejected (RESOURCE_EXHAUSTED: early rejection, limits; also
counted by code). Latency histograms count ok requests only. Never logs prompt text.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.metrics import OUTCOMES, outcome_of

log = logging.getLogger("epdserve.router.requests")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("epdserve_router_requests", "requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.errors = Counter("epdserve_router_errors", "failed (error or rejected) requests by gRPC code",
                              ["code"], registry=r)
        self.paths = Counter("epdserve_router_path", "ok requests by path (E->P->D, P->D, E->PD, PD)", ["path"],
                             registry=r)
        self.ttft = Histogram("epdserve_router_ttft_seconds", "time to the first token (ok requests)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("epdserve_router_tpot_seconds", "mean time per output token after the first "
                              "(ok requests with 2+ tokens)", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("epdserve_router_e2e_seconds", "request latency, start to last event (ok requests)",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("epdserve_router_requests_in_flight", "requests being served now", registry=r)
        self.prompt_tokens = Counter("epdserve_router_prompt_tokens", "prompt tokens of ok requests", registry=r)
        self.completion_tokens = Counter("epdserve_router_completion_tokens", "tokens generated (all requests)",
                                         registry=r)

    def begin(self) -> RequestRecord:
        self.in_flight.inc()
        return RequestRecord(self, time.perf_counter())


@dataclasses.dataclass
class RequestRecord:
    metrics: RouterMetrics
    start: float
    request_id: str = ""
    images: int = 0
    completion_tokens: int = 0
    first_at: float | None = None
    finish_reason: str = ""
    prompt_tokens: int = 0
    local_prefill: bool | None = None  # None: the path is unknown (no Complete)
    failed_code: str = ""
    trace_id: str = ""  # the request's trace when tracing is on and it is sampled

    def chunk(self, tokens: int) -> None:
        self._first()
        self.completion_tokens += tokens

    def finished(self, event) -> None:
        """`event`: the orchestrator's Finished."""
        self._first()
        self.finish_reason, self.prompt_tokens = event.finish_reason, event.prompt_tokens
        if "local_prefill" in event.timings_ms:
            self.local_prefill = bool(event.timings_ms["local_prefill"])

    def failed(self, code: str) -> None:
        self.failed_code = code

    def _first(self) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()

    @property
    def path(self) -> str:
        if self.local_prefill is None:
            return ""
        if self.images:
            return "E->PD" if self.local_prefill else "E->P->D"
        return "PD" if self.local_prefill else "P->D"

    def end(self, exc: BaseException | None) -> tuple[str, str]:
        """Count the request once, log its line; returns (outcome, code)."""
        now, m = time.perf_counter(), self.metrics
        m.in_flight.dec()
        if exc is not None:
            outcome, code = outcome_of(exc, rejected_codes=("RESOURCE_EXHAUSTED",))
        elif self.failed_code:
            outcome, code = "error", self.failed_code
        elif self.finish_reason == "abort":
            outcome, code = "cancelled", "CANCELLED"
        else:
            outcome, code = "ok", "OK"
        m.requests.labels(outcome).inc()
        m.completion_tokens.inc(self.completion_tokens)
        if outcome in ("error", "rejected"):
            m.errors.labels(code).inc()
        ttft = (self.first_at or now) - self.start
        if outcome == "ok":
            self._observe_ok(now, ttft)
        fields = {"request_id": self.request_id or "-", "trace_id": self.trace_id or "-", "outcome": outcome,
                  "code": code, "path": self.path or "-", "images": self.images, "prompt_tokens": self.prompt_tokens,
                  "completion_tokens": self.completion_tokens, "ttft_ms": round(ttft * 1000.0, 1),
                  "e2e_ms": round((now - self.start) * 1000.0, 1)}
        log.info("request id=%(request_id)s trace_id=%(trace_id)s outcome=%(outcome)s code=%(code)s path=%(path)s "
                 "images=%(images)d prompt_tokens=%(prompt_tokens)d completion_tokens=%(completion_tokens)d "
                 "ttft_ms=%(ttft_ms).1f e2e_ms=%(e2e_ms).1f", fields, extra={"fields": fields})
        return outcome, code

    def _observe_ok(self, now: float, ttft: float) -> None:
        m = self.metrics
        m.ttft.observe(ttft)
        m.e2e.observe(now - self.start)
        m.prompt_tokens.inc(self.prompt_tokens)
        if self.path:
            m.paths.labels(self.path).inc()
        if self.completion_tokens > 1 and self.first_at is not None:
            m.tpot.observe((now - self.first_at) / (self.completion_tokens - 1))
