"""Readiness events for layer-wise publishing, on a Redis stream per hand-off.

The producer appends one event per published layer (and a final one); a consumer reads them in
order, blocking until the next arrives, so it can load layer 0 while later layers are still being
computed. Streams keep events published before the consumer started reading (pub/sub would not).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from mmcache.guard import RedisGuard
from mmcache.index import RedisIndex


class ReadinessStream:
    def __init__(self, index: RedisIndex, guard: RedisGuard) -> None:
        self.index, self.guard = index, guard

    def stream_key(self, prefix: str) -> str:
        return f"{self.index.prefix}:ready:{prefix}"

    async def publish(self, prefix: str, event: dict[str, str], *, ttl_s: float) -> None:
        key = self.stream_key(prefix)

        async def run():
            pipe = self.index.redis.pipeline(transaction=False)
            pipe.xadd(key, event)
            pipe.pexpire(key, max(1, int(ttl_s * 1000)))
            await pipe.execute()

        await self.guard.run(run)

    async def follow(self, prefix: str, *, timeout_s: float) -> AsyncIterator[dict[str, str]]:
        """Yield events in publication order; each wait is bounded by timeout_s (TimeoutError)."""
        key, last = self.stream_key(prefix), "0"
        block_ms = max(1, int(timeout_s * 1000))
        while True:
            streams = {key: last}
            reply = await self.guard.run(
                lambda streams=streams: self.index.redis.xread(streams, count=64, block=block_ms),
                timeout_s=timeout_s + 5,
            )
            if not reply:
                raise TimeoutError(f"no readiness event on {prefix} within {timeout_s:.1f} s")
            for event_id, fields in reply[0][1]:
                last = event_id
                yield {_text(k): _text(v) for k, v in fields.items()}

    async def delete(self, prefix: str) -> None:
        await self.guard.run(lambda: self.index.redis.delete(self.stream_key(prefix)))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
