"""Discrete-event simulation parts: the event clock, processor-shared CPU jobs, residual noise
and an LRU set. Used by `tuner.sim`; nothing here knows about E/P/D.

Invariant: the clock never moves backwards, and a job's completion callback runs exactly once,
when its remaining work reaches zero at the speed processor sharing gives it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
import itertools
import random
from collections.abc import Callable

from tuner.profile import Fit


class Noise:
    """Multiplicative service-time noise drawn from a fit's residual quantiles."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def draw(self, fit: Fit, ms: float) -> float:
        r = fit.residuals
        if len(r) == 1:
            return ms * r[0]
        u = self.rng.random() * (len(r) - 1)
        i = int(u)
        return ms * (r[i] + (r[min(i + 1, len(r) - 1)] - r[i]) * (u - i))


class Clock:
    """The event queue."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list = []
        self._order = itertools.count()

    def at(self, time_s: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(time_s, self.now), next(self._order), action))

    def after(self, delay_s: float, action: Callable[[], None]) -> None:
        self.at(self.now + delay_s, action)

    def run(self) -> None:
        while self._queue:
            self.now, _, action = heapq.heappop(self._queue)
            action()


@dataclasses.dataclass(eq=False)
class Job:
    total_ms: float            # stand-alone service time
    remaining_ms: float
    done: Callable[[], None]
    version: int = 0


class Cpu:
    """Runs jobs (ms of stand-alone service time) for replicas. Without shared cores every job runs
    at full speed; with `cores` > 0 the busy jobs share them (processor sharing): each runs at
    min(1, cores / busy) and finish times are recomputed whenever that changes. A job's work can be
    shortened while it runs (a decode segment cut by an arrival)."""

    def __init__(self, clock: Clock, cores: float) -> None:
        self.clock, self.cores = clock, cores
        self._jobs: set[Job] = set()
        self._speed, self._since = 1.0, 0.0

    def run(self, work_ms: float, done: Callable[[], None]) -> Job:
        self._advance()
        job = Job(work_ms, work_ms, done)
        self._jobs.add(job)
        self._reschedule(all_jobs=self.cores > 0)
        if self.cores <= 0:
            self._schedule(job)
        return job

    def progress_ms(self, job: Job) -> float:
        self._advance()
        return job.total_ms - job.remaining_ms

    def shorten(self, job: Job, total_ms: float) -> None:
        self._advance()
        job.remaining_ms = max(job.remaining_ms - (job.total_ms - total_ms), 0.0)
        job.total_ms = total_ms
        self._schedule(job)

    def _speed_now(self) -> float:
        return min(1.0, self.cores / len(self._jobs)) if self.cores > 0 and self._jobs else 1.0

    def _advance(self) -> None:
        elapsed_ms = (self.clock.now - self._since) * 1000.0 * self._speed
        if elapsed_ms > 0:
            for job in self._jobs:
                job.remaining_ms = max(job.remaining_ms - elapsed_ms, 0.0)
        self._since = self.clock.now

    def _reschedule(self, all_jobs: bool) -> None:
        self._speed = self._speed_now()
        if all_jobs:
            for job in self._jobs:
                self._schedule(job)

    def _schedule(self, job: Job) -> None:
        job.version += 1
        self.clock.after(job.remaining_ms / 1000.0 / self._speed, functools.partial(self._finish, job, job.version))

    def _finish(self, job: Job, version: int) -> None:
        if job.version != version or job not in self._jobs:
            return
        self._advance()
        self._jobs.discard(job)
        self._reschedule(all_jobs=self.cores > 0)
        job.done()


class Lru:
    def __init__(self, capacity: int) -> None:
        self.capacity, self._keys = capacity, collections.OrderedDict()

    def hit(self, key) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        return False

    def add(self, key) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
