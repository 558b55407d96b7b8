"""Thread pools that take a list of jobs at once, from the event loop.

Invariant: `DealtPool.map(fn, jobs)` returns fn(*job) for every job, in job order, having dealt the
jobs out round-robin into at most one chunk per thread: one executor hop per thread instead of
one per job, so the event loop (and the GIL it shares) pays for a few hand-offs, not hundreds.
It returns or raises only once every chunk has stopped, cancellation included (a running thread
cannot be stopped: a caller that frees what the jobs write into must not do so before that).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Any


class DealtPool:
    def __init__(self, threads: int, name: str) -> None:
        self.threads = max(1, threads)
        self._executor = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix=name)

    async def map(self, fn: Callable[..., Any], jobs: Sequence[tuple]) -> list:
        if not jobs:
            return []
        chunks = [jobs[w :: self.threads] for w in range(min(self.threads, len(jobs)))]
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._executor, run_all, fn, chunk) for chunk in chunks]
        try:
            done = await asyncio.shield(asyncio.gather(*futures))
        except BaseException:
            await wait_until_done(futures)
            raise
        results: list = [None] * len(jobs)
        for w, chunk_results in enumerate(done):
            results[w :: self.threads] = chunk_results
        return results

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


async def wait_until_done(futures: Sequence[asyncio.Future]) -> None:
    """Wait until every future is done, whatever cancels the waiter meanwhile (for a caller that
    must not go on, e.g. free memory, while work it started may still touch it)."""
    while not all(f.done() for f in futures):
        try:
            await asyncio.shield(asyncio.wait(futures))
        except asyncio.CancelledError:
            continue


def run_all(fn: Callable[..., Any], jobs: Sequence[tuple]) -> list:
    """fn(*job) for each job, here and now."""
    return [fn(*job) for job in jobs]
