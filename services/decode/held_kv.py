"""How much hand-off KV a decode service takes from the cache ahead of its paged KV.

Invariant: the bytes held (requests fetched but not yet loaded into the paged KV, whose layers
become private host copies while they wait for free blocks) never exceed `limit_bytes`, except
for one request alone (one larger than the limit is let in when nothing else is held, so no
request waits forever); requests are let in in arrival order. A request that does not fit waits
before it fetches anything: its KV stays leased in the prefill's pool, where it holds back new
prompts (prefill waits for room; the router prefers replicas with room), instead of piling up in
this process's memory.
"""

from __future__ import annotations

import asyncio
import collections


class HeldKV:
    """A FIFO byte budget for the event loop's coroutines (not thread-safe)."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"limit_bytes must be positive (got {limit_bytes})")
        self.limit_bytes = limit_bytes
        self.held_bytes = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for _, granted in self._waiting if not granted.done())

    async def acquire(self, nbytes: int) -> None:
        """Returns once `nbytes` are held for the caller (who must `release` them exactly once).
        Cancelled while waiting: nothing is held."""
        if not self._waiting and self._fits(nbytes):
            self.held_bytes += nbytes
            return
        granted = asyncio.get_running_loop().create_future()
        entry = (nbytes, granted)
        self._waiting.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # let in just as the caller went away
                self.release(nbytes)
            elif entry in self._waiting:
                self._waiting.remove(entry)
                self._let_in()
            raise

    def release(self, nbytes: int) -> None:
        self.held_bytes -= nbytes
        self._let_in()

    def _fits(self, nbytes: int) -> bool:
        return self.held_bytes == 0 or self.held_bytes + nbytes <= self.limit_bytes

    def _let_in(self) -> None:
        while self._waiting and (self._waiting[0][1].done() or self._fits(self._waiting[0][0])):
            nbytes, granted = self._waiting.popleft()
            if not granted.done():
                self.held_bytes += nbytes
                granted.set_result(None)
