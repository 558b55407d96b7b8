"""Cache metrics (prometheus-client), one registry per cache so several caches can live in one
process (tests); the service exposes the registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


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

    def set_available(self, available: bool) -> None:
        self.available.set(1 if available else 0)

    def value(self, name: str) -> float:
        """Current value of one metric (tests, CLI)."""
        metric = getattr(self, name)
        return metric._value.get()
