"""Cache metrics (prometheus-client), one registry per cache so several caches can live in one
process (tests); the service exposes the registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

WAIT_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class CacheMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.available = Gauge("epdserve_cache_available", "1 while the Redis index answers, 0 while it is away",
                               registry=self.registry)
        self.available.set(1)
        self.hits = Counter("epdserve_cache_hits", "index lookups that found a live entry", registry=self.registry)
        self.misses = Counter("epdserve_cache_misses", "lookups or reads that found nothing usable",
                              registry=self.registry)
        self.corrupt = Counter("epdserve_cache_corrupt", "reads whose bytes failed verification",
                               registry=self.registry)
        self.bytes_put = Counter("epdserve_cache_put_bytes", "bytes published", registry=self.registry)
        self.bytes_read_local = Counter("epdserve_cache_read_local_bytes", "bytes read in place on this host",
                                        registry=self.registry)
        self.bytes_read_remote = Counter("epdserve_cache_read_remote_bytes", "bytes streamed from other hosts",
                                         registry=self.registry)

        self.pool_capacity = Gauge("epdserve_cache_pool_capacity_bytes", "bytes of the host shared-memory pool",
                                   registry=self.registry)
        self.pool_used = Gauge("epdserve_cache_pool_used_bytes", "bytes of the pool held by entries and "
                               "reservations", registry=self.registry)
        self.reserve_wait = Histogram("epdserve_cache_reserve_wait_seconds", "time a reservation (a prompt's KV, "
                                      "in prefill) waited for room in the pool", buckets=WAIT_BUCKETS_S,
                                      registry=self.registry)
        self.reserve_refused = Counter("epdserve_cache_reserve_refused", "reservations refused: larger than the "
                                       "pool, or no room within their time limit", registry=self.registry)

    def watch_pool(self, pool) -> None:
        """Report the pool's capacity and use at scrape time."""
        self.pool_capacity.set_function(lambda: pool.capacity_bytes)
        self.pool_used.set_function(lambda: pool.used_bytes)

    def set_available(self, available: bool) -> None:
        self.available.set(1 if available else 0)

    def value(self, name: str) -> float:
        """Current value of one metric (tests, CLI)."""
        metric = getattr(self, name)
        return metric._value.get()
