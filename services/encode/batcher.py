"""Dynamic batching of images across requests, with in-flight deduplication.

Invariants: each queued job is encoded exactly once and its future resolved (result or error);
jobs with equal keys that overlap in time share one tower run; a batch holds at most `max_batch`
images and the first image of a batch waits at most `max_wait_ms` for company; at most
PIPELINE_DEPTH batches are launched and not yet complete (one on the device while the model
thread prepares the next), and batches complete in launch order on the device.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import NamedTuple

from services.encode.encoder import ImageEncoder
from services.load import LoadTracker, RunningWork
from services.runtime import ModelExecutor

PIPELINE_DEPTH = 2


@dataclasses.dataclass
class _Job:
    key: str
    image: object
    keep_ratio: float
    future: asyncio.Future
    queued_at: float


class Encoded(NamedTuple):
    """One image's embedding and how it was produced."""
    tensor: object
    batch_size: int        # images in the tower call that produced it
    shared: bool           # deduplicated: another request's in-flight encoding of the same image
    wait_s: float          # from queued to the start of its tower call
    tower_s: float         # the tower call's duration


@dataclasses.dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    deduplicated: int = 0
    largest_batch: int = 0


class EncodeBatcher:
    def __init__(self, encoder: ImageEncoder, executor: ModelExecutor, *, max_batch: int, max_wait_ms: float,
                 to_host: bool = True, load: LoadTracker | None = None) -> None:
        self.encoder, self.executor, self.to_host = encoder, executor, to_host
        self.load = load or LoadTracker("encode", "")
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: list[_Job] = []
        self._inflight: dict[str, asyncio.Future] = {}
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._launch_slots = asyncio.Semaphore(PIPELINE_DEPTH)
        self._completions: set[asyncio.Task] = set()
        self._last_done = 0.0   # perf_counter when the last batch completed (its successor's work starts then)

    async def encode(self, key: str, image, keep_ratio: float) -> Encoded:
        """The embedding for one image, with the batch it ran in."""
        if self._worker is None:
            self._worker = asyncio.create_task(self._run())
        shared = self._inflight.get(key)
        if shared is not None:
            self.stats.deduplicated += 1
            return (await asyncio.shield(shared))._replace(shared=True)
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        self._queue.append(_Job(key, image, keep_ratio, future, time.monotonic()))
        self._arrived.set()
        return await asyncio.shield(future)

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            await self._launch_slots.acquire()   # a pipeline slot first: the batch gathers meanwhile
            await self._gather()
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
            if not self._queue:
                self._arrived.clear()
            if batch:
                await self._launch(batch)
            else:
                self._launch_slots.release()

    async def _gather(self) -> None:
        """Wait for company: until the batch is full or the oldest job has waited max_wait."""
        while len(self._queue) < self.max_batch:
            left = self._queue[0].queued_at + self.max_wait_s - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.002))

    async def _launch(self, batch: list[_Job]) -> None:
        """Queue the batch's device work on the model thread, then complete it in the background
        (the loop goes on gathering the next batch). Owns one pipeline slot, released when done."""
        started = time.monotonic()
        counted: list[RunningWork] = []

        def launch():  # counted as running from when the model thread takes it up, not while it waits
            counted.append(self.load.start_running(len(batch)))  # behind other work there (E+P colocated)
            return self.encoder.launch([j.image for j in batch], [j.keep_ratio for j in batch], to_host=self.to_host)

        try:
            pending = await self.executor.run(launch, one_request=False)
        except Exception as exc:  # every waiter learns of the failure
            self._fail(batch, exc, counted[0] if counted else None)
            return
        running = counted[0]
        task = asyncio.create_task(self._complete(batch, pending, started, running))
        self._completions.add(task)
        task.add_done_callback(self._completions.discard)

    async def _complete(self, batch: list[_Job], pending, started: float, running: RunningWork) -> None:
        """Wait (off the loop) for a launched batch's embeddings and hand them to its waiters. A
        device fault surfacing here fails this batch; the engine's failure count sees it at the
        next launch (device errors are sticky)."""
        try:
            tensors = await asyncio.to_thread(pending.wait)
        except Exception as exc:
            self._fail(batch, exc, running)
            return
        self._last_done = running.end(completed=True, busy_from=self._last_done)
        self._launch_slots.release()
        self.stats.batches += 1
        self.stats.images += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        tower_s = time.monotonic() - started
        for job, tensor in zip(batch, tensors):
            self._finish(job, result=Encoded(tensor, len(batch), False, started - job.queued_at, tower_s))

    def _fail(self, batch: list[_Job], exc: BaseException, running: RunningWork | None) -> None:
        if running is not None:
            running.end(completed=False)
        self._launch_slots.release()
        for job in batch:
            self._finish(job, exc=exc)

    def _finish(self, job: _Job, *, result=None, exc: BaseException | None = None) -> None:
        self._inflight.pop(job.key, None)
        if job.future.done():
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    async def close(self) -> None:
        tasks = [t for t in (self._worker, *self._completions) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
