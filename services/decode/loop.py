"""The decode service's engine loop: runs `DecodeEngine.step` on the model thread while there is
work and hands each step's events to the requests' queues (event-loop side).

Arrivals and aborts are collected on the event loop and passed into the next step, so the
engine's state is only ever touched on the model thread, one step at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from epdserve.errors import AlreadyExistsError, EpdserveError, InternalError, UnavailableError
from services.decode.engine import DecodeEngine, DecodeJob, StepResult
from services.runtime import ModelExecutor

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str  # "inputs_done" | "token" | "abort" | "error"
    token: int = -1
    finish: str = ""
    batch_size: int = 0  # sequences in the step that produced the token
    error: Exception | None = None


class EngineLoop:
    def __init__(self, engine: DecodeEngine, executor: ModelExecutor) -> None:
        self.engine, self.executor = engine, executor
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._arrivals: list[DecodeJob] = []
        self._aborts: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.last_batch_size = 0
        self.step_ms = 0.0  # moving average of steps that decoded (for the load report)

    def submit(self, job: DecodeJob) -> asyncio.Queue[Event]:
        """Queue a job for the next step; its events arrive on the returned queue. Call `forget`
        when done reading. Raises AlreadyExistsError for a request id already in flight."""
        if job.request_id in self._queues:
            raise AlreadyExistsError(f"request_id {job.request_id!r} is already decoding")
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[job.request_id] = queue
        self._arrivals.append(job)
        self._kick()
        return queue

    def abort(self, request_id: str) -> bool:
        """Ask the engine to drop the request at its next step; False when it is not in flight."""
        if request_id not in self._queues:
            return False
        self._aborts.append(request_id)
        self._kick()
        return True

    def forget(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _kick(self) -> None:
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="decode-engine-loop")

    async def _run(self) -> None:
        while True:
            if not (self._arrivals or self._aborts or self.engine.has_work):
                self._wake.clear()
                await self._wake.wait()
                continue
            arrivals, aborts = self._arrivals, self._aborts
            self._arrivals, self._aborts = [], []
            started = time.perf_counter()
            try:
                result = await self.executor.run(self.engine.step, arrivals, aborts)
            except Exception as exc:  # the batch's state is unknown: fail everything in it
                log.error("decode step failed", exc_info=exc)
                try:
                    failed = await self.executor.run(self.engine.reset)
                except Exception:  # the engine is unusable (failed for good): fail every stream here
                    failed = list(self._queues)
                if self.executor.failed is not None:  # UNAVAILABLE: the router re-sends what produced nothing
                    exc = UnavailableError("this decode replica's model engine failed; retry on another replica")
                self._fail([*failed, *(job.request_id for job in arrivals)], exc)
                if self.executor.failed is not None:
                    return  # each later arrival starts a loop that fails it at once
                continue
            if result.batch_size:
                elapsed_ms = (time.perf_counter() - started) * 1000.0
                self.step_ms = elapsed_ms if not self.step_ms else 0.8 * self.step_ms + 0.2 * elapsed_ms
            self._deliver(result)

    def _deliver(self, result: StepResult) -> None:
        self.last_batch_size = result.batch_size
        for request_id in result.inputs_done:
            self._put(request_id, Event("inputs_done"))
        for request_id in result.aborted:
            self._put(request_id, Event("abort"))
        for event in result.tokens:
            self._put(event.request_id, Event("token", event.token, event.finish, result.batch_size))

    def _fail(self, request_ids: list[str], exc: Exception) -> None:
        if isinstance(exc, EpdserveError):
            error = exc
        else:
            error = InternalError("decode step failed (see the service log)")
            error.__cause__ = exc
        for request_id in dict.fromkeys(request_ids):
            self._put(request_id, Event("error", error=error))

    def _put(self, request_id: str, event: Event) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(event)
