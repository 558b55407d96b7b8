"""DealtPool: every job runs once, results come back in job order, one hand-off per thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from epdserve.threadpool import DealtPool


@pytest.mark.parametrize("jobs", [0, 1, 3, 4, 11])
def test_results_in_job_order_with_at_most_one_chunk_per_thread(jobs):
    pool = DealtPool(4, "test")
    threads_by_job = {}

    def work(i: int) -> int:
        threads_by_job[i] = threading.get_ident()
        return i * i

    try:
        assert asyncio.run(pool.map(work, [(i,) for i in range(jobs)])) == [i * i for i in range(jobs)]
    finally:
        pool.shutdown()
    assert sorted(threads_by_job) == list(range(jobs))
    for i in range(jobs):   # jobs dealt round-robin: job i shares its chunk (and thread) with job i + 4
        if i + 4 < jobs:
            assert threads_by_job[i] == threads_by_job[i + 4]


def test_a_failing_job_fails_the_map():
    pool = DealtPool(2, "test")

    def work(i: int) -> int:
        if i == 3:
            raise ValueError("job 3")
        return i

    try:
        with pytest.raises(ValueError, match="job 3"):
            asyncio.run(pool.map(work, [(i,) for i in range(5)]))
    finally:
        pool.shutdown()


@pytest.mark.parametrize("cancels", [1, 3])
def test_a_cancelled_map_returns_only_after_every_running_job_has_stopped(cancels):
    """The caller may free what the jobs write into as soon as map() ends, even by cancellation."""
    pool = DealtPool(2, "test")
    release, finished = threading.Event(), []

    def work(i: int) -> None:
        release.wait(5)
        finished.append(i)

    async def main() -> list[int]:
        task = asyncio.create_task(pool.map(work, [(0,), (1,)]))
        await asyncio.sleep(0.05)
        for _ in range(cancels):   # repeated cancels do not cut the wait short either
            task.cancel()
            await asyncio.sleep(0.02)
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return list(finished)

    try:
        assert sorted(asyncio.run(main())) == [0, 1]
    finally:
        pool.shutdown()


def test_a_failing_job_fails_the_map_only_after_the_others_stopped():
    pool = DealtPool(2, "test")
    finished = []

    def work(i: int) -> None:
        if i == 0:
            raise ValueError("job 0")
        threading.Event().wait(0.2)
        finished.append(i)

    try:
        with pytest.raises(ValueError, match="job 0"):
            asyncio.run(pool.map(work, [(0,), (1,)]))
        assert finished == [1]
    finally:
        pool.shutdown()
