"""Prometheus metrics of the encode / prefill / decode services.

Every metric lives in the service's own registry (`ServiceServer.registry`, created at service
start, never at import), served on `GET /metrics` with --metrics-port. Requests are counted once
each when their handler returns (never per token); queue lengths and KV usage are read at scrape
time from the objects that already keep them (`LoadTracker`, the decode engine's KV cache).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from epdserve.errors import EpdserveError

if TYPE_CHECKING:
    from services.load import LoadTracker

OUTCOMES = ("ok", "error", "cancelled", "rejected")


def outcome_of(exc: BaseException | None, rejected_codes: Iterable[str] = ()) -> tuple[str, str]:
    """(outcome, gRPC code name) of a request that ended with `exc` (None: it succeeded).
    A cancelled call or a closed stream is "cancelled"; a typed error whose code is in
    `rejected_codes` is "rejected"; any other failure is "error" (unexpected ones: INTERNAL)."""
    if exc is None:
        return "ok", "OK"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled", "CANCELLED"
    if isinstance(exc, EpdserveError):
        return ("rejected" if exc.code in rejected_codes else "error"), exc.code
    code = getattr(exc, "code", None)  # a grpc.RpcError passed through
    if callable(code):
        return "error", getattr(code(), "name", "UNKNOWN")
    return "error", "INTERNAL"


class FunctionCollector:
    """A collector whose metric families are computed by `collect_fn` at scrape time (runs on the
    metrics server's thread: `collect_fn` must only read thread-safe or plain counters)."""

    def __init__(self, collect_fn: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect_fn

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()


def registry_collector(registry: CollectorRegistry) -> FunctionCollector:
    """Another registry's metrics (e.g. mmcache's `CacheMetrics.registry`) served through this one."""
    return FunctionCollector(registry.collect)


def gauge(name: str, documentation: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    labels = labels or {}
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class StageMetrics:
    """Metrics every stage replica has: requests by outcome and code (counted by its `LoadTracker`
    when each request's handler returns) and the waiting / running gauges read from the tracker.
    A process serving several stages (prefill --with-encode) has one of each per stage label."""

    def __init__(self, registry: CollectorRegistry, *loads: "LoadTracker") -> None:
        self.registry = registry
        self.requests = Counter("epdserve_stage_requests", "requests this stage replica finished, by outcome "
                                "(ok | error | cancelled) and gRPC code", ["stage", "outcome", "code"],
                                registry=registry)
        registry.register(FunctionCollector(lambda: _load_gauges(loads)))
        for load in loads:
            load.on_finish = functools.partial(self.finished, load.stage)

    def finished(self, stage: str, exc: BaseException | None) -> None:
        outcome, code = outcome_of(exc)
        self.requests.labels(stage, outcome, code).inc()


def _load_gauges(loads: Iterable["LoadTracker"]) -> Iterator[Metric]:
    """One family per gauge, one sample per stage (a name may appear once in an exposition)."""
    waiting = GaugeMetricFamily("epdserve_requests_waiting", "accepted requests not running yet", labels=["stage"])
    running = GaugeMetricFamily("epdserve_requests_running", "requests running on the model thread", labels=["stage"])
    for load in loads:
        queued, active = load.counts()
        waiting.add_metric([load.stage], queued)
        running.add_metric([load.stage], active)
    yield waiting
    yield running


class EncodeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.cache_hits = Counter("epdserve_encode_cache_hits", "images served from the embedding cache",
                                  registry=registry)
        self.cache_misses = Counter("epdserve_encode_cache_misses", "images that had to be encoded",
                                    registry=registry)

    def images(self, hits: int, misses: int) -> None:
        self.cache_hits.inc(hits)
        self.cache_misses.inc(misses)


class PrefillMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.prompt_tokens = Counter("epdserve_prefill_prompt_tokens", "prompt tokens of finished prefills",
                                     registry=registry)
        self.prefix_hit_tokens = Counter("epdserve_prefill_prefix_hit_tokens",
                                         "prompt tokens whose KV came from the prefix cache", registry=registry)

    def prefilled(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_hit_tokens.inc(hit_tokens)


def register_decode_metrics(registry: CollectorRegistry, engine, experts=None) -> None:
    """KV usage of the decode engine's paged cache and, with expert offloading, its stats, both
    read at scrape time."""
    def collect() -> Iterator[Metric]:
        kv = engine.kv
        capacity, free = kv.capacity_blocks, kv.num_free_blocks
        yield gauge("epdserve_decode_kv_capacity_blocks", "KV blocks of the paged cache", capacity)
        yield gauge("epdserve_decode_kv_free_blocks", "free KV blocks", free)
        yield gauge("epdserve_decode_kv_cache_usage_ratio", "fraction of KV blocks in use",
                    (capacity - free) / capacity if capacity else 0.0)
        yield CounterMetricFamily("epdserve_decode_generated_tokens", "tokens the decode engine produced, "
                                  "including any after a client went away", value=engine.generated_tokens)
        if experts is not None:
            yield from _expert_gauges(experts.stats().as_dict())

    registry.register(FunctionCollector(collect))


def _expert_gauges(stats: dict) -> Iterator[Metric]:
    for key, value in sorted(stats.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield gauge(f"epdserve_decode_expert_{key}", f"expert offloading: {key} (OffloadStats)", float(value))
