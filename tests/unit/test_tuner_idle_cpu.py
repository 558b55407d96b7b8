"""The profiler's idle-CPU measurement on a shared host: what the host's other processes keep
busy, read from the host's counters, without the measuring process's own CPU."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from tuner.profiler import PROC_STAT, host_busy_cpu_s, idle_host_cores

pytestmark = [pytest.mark.unit, pytest.mark.skipif(not PROC_STAT.exists(), reason="needs Linux /proc/stat")]


def test_a_spinning_process_counts_as_about_one_busy_core():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        cores = asyncio.run(idle_host_cores(1.5))
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.6 <= cores <= len(os.sched_getaffinity(0)) + 0.1, cores


def test_the_measuring_process_own_cpu_is_left_out():
    async def measure_while_spinning() -> float:
        async def spin() -> None:
            end = asyncio.get_running_loop().time() + 1.0
            while asyncio.get_running_loop().time() < end:
                sum(range(1000))
                await asyncio.sleep(0)
        measuring = asyncio.ensure_future(idle_host_cores(1.0))
        await spin()
        return await measuring

    before = host_busy_cpu_s()
    cores = asyncio.run(measure_while_spinning())
    assert host_busy_cpu_s() - before >= 0.6   # this process was busy for most of that second...
    assert cores < 0.4, cores                  # ...and none of it is counted as the host's idle load
