"""Every Redis call goes through a RedisGuard: bounded by a timeout, and after a failure the
guard opens (calls fail fast with CacheUnavailableError) until a probe sees Redis answer again.

Callers treat CacheUnavailableError as "no index right now": lookups miss, index writes are
skipped, the data path (refs carry the owner's location and addresses) keeps working.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from epdserve.errors import UnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")


class CacheUnavailableError(UnavailableError):
    """Redis is down, stalled or unreachable; the cache index is unavailable for now."""


class RedisGuard:
    def __init__(self, redis, *, timeout_s: float, retry_s: float = 0.5, max_retry_s: float = 5.0,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.redis = redis
        self.timeout_s = timeout_s
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.available = True
        self._backoff = retry_s
        self._retry_at = 0.0
        self._on_change = on_change

    async def run(self, operation: Callable[[], Awaitable[T]], *, timeout_s: float | None = None) -> T:
        """Run one Redis operation, or raise CacheUnavailableError (fast while the guard is open)."""
        if not self.available and time.monotonic() < self._retry_at:
            raise CacheUnavailableError("cache index unavailable (Redis)")
        try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation (the owner's
            # background loop would then outlive close())
            async with asyncio.timeout(timeout_s or self.timeout_s):
                result = await operation()
        except (OSError, asyncio.TimeoutError, _redis_errors()) as exc:
            self._trip(exc)
            raise CacheUnavailableError(f"cache index unavailable (Redis: {type(exc).__name__})") from None
        self._recover()
        return result

    async def probe(self) -> bool:
        """One PING (used by the owner's background loop while the guard is open)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.redis.ping()
        except (OSError, asyncio.TimeoutError, _redis_errors()):
            return False
        self._recover()
        return True

    def _trip(self, exc: BaseException) -> None:
        if self.available:
            log.warning("Redis unavailable (%s): caching degrades to recompute until it returns", exc)
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.max_retry_s)
        self._set(False)

    def _recover(self) -> None:
        self._backoff = self.retry_s
        if not self.available:
            log.info("Redis reachable again: cache index back")
        self._set(True)

    def _set(self, available: bool) -> None:
        changed = available != self.available
        self.available = available
        if changed and self._on_change is not None:
            self._on_change(available)


def _redis_errors() -> type[BaseException]:
    import redis.exceptions

    return redis.exceptions.RedisError
