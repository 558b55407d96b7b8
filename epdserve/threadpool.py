"""Thread pools that take a list of jobs at once, from the event loop.

Invariant: `DealtPool.map(fn, jobs)` returns fn(*job) for every job, in job order, having dealt the
jobs out round-robin into at most one chunk per thread: one executor hop per thread instead of
one per job, so the event loop (and the GIL it shares) pays for a few hand-offs, not hundreds.
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
        done = await asyncio.gather(*(loop.run_in_executor(self._executor, run_all, fn, chunk) for chunk in chunks))
        results: list = [None] * len(jobs)
        for w, chunk_results in enumerate(done):
            results[w :: self.threads] = chunk_results
        return results

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def run_all(fn: Callable[..., Any], jobs: Sequence[tuple]) -> list:
    """fn(*job) for each job, here and now."""
    return [fn(*job) for job in jobs]
