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
