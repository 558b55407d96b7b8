"""Load reports: what a stage replica tells the router (LoadService.GetLoad) so that the router can
predict a request's queue wait and service time there (Mooncake-style placement, early rejection).

Invariant: a request is counted from the moment the servicer accepts it until its handler returns
(whatever the outcome), so queued_requests + running_requests is exactly the replica's in-flight
work; the service-time model is fitted only from work that ran to completion.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from epdserve.errors import NotFoundError
from epdserve.transport.errors import unary_errors
from epdserve.v1 import load_pb2, load_pb2_grpc

T = TypeVar("T")
SAMPLES = 32  # completed requests (or batches) the service-time fit looks at


class ServiceTimeModel:
    """seconds = overhead + work / rate, least squares over the last SAMPLES completions. With one
    distinct work size (or a non-positive slope) it falls back to a pure rate (overhead 0)."""

    def __init__(self) -> None:
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=SAMPLES)

    def add(self, work: float, seconds: float) -> None:
        if work > 0 and seconds > 0:
            self._samples.append((float(work), float(seconds)))

    def fit(self) -> tuple[float, float]:
        """(work per second, overhead seconds); (0, 0) before any sample."""
        if not self._samples:
            return 0.0, 0.0
        n = len(self._samples)
        mean_w = sum(w for w, _ in self._samples) / n
        mean_s = sum(s for _, s in self._samples) / n
        var_w = sum((w - mean_w) ** 2 for w, _ in self._samples)
        if var_w > 0:
            slope = sum((w - mean_w) * (s - mean_s) for w, s in self._samples) / var_w
            overhead = mean_s - slope * mean_w
            if slope > 0 and overhead >= 0:
                return 1.0 / slope, overhead
        return mean_w / mean_s, 0.0


class RunningWork:
    """One piece of work counted as running by a LoadTracker (see `LoadTracker.start_running`)."""

    def __init__(self, tracker: LoadTracker, work: int, started: float) -> None:
        self._tracker, self._work, self._started = tracker, work, started

    def end(self, completed: bool, busy_from: float = 0.0) -> float:
        """Stop counting it; completed work is fitted with its duration from its start, or from
        `busy_from` (a `time.perf_counter()` value) when later: pipelined work that queued behind
        the previous piece costs the replica only its own share. Returns now."""
        now = time.perf_counter()
        self._tracker._stopped_running()
        if completed:
            self._tracker.record(self._work, now - max(self._started, busy_from))
        return now


class LoadTracker:
    """In-flight work and the service-time model of one stage replica. Thread-safe: `running`
    wraps work on the model thread while the event loop reads `report()`."""

    def __init__(self, stage: str, replica_id: str, extra: Callable[[load_pb2.LoadReport], None] | None = None) -> None:
        self.stage, self.replica_id, self.extra = stage, replica_id, extra
        self.model = ServiceTimeModel()
        self._lock = threading.Lock()
        self._in_flight = self._running = self._queued_work = 0
        self.on_finish: Callable[[BaseException | None], None] | None = None  # per request: how it ended (metrics)

    @contextlib.contextmanager
    def request(self, work: int) -> Iterator[None]:
        """Count one accepted request carrying `work` units until the block exits; then call
        `on_finish` with the exception that ended it (None when it succeeded)."""
        with self._lock:
            self._in_flight += 1
            self._queued_work += work
        error = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            with self._lock:
                self._in_flight -= 1
                self._queued_work -= work
            if self.on_finish is not None:
                self.on_finish(error)

    def counts(self) -> tuple[int, int]:
        """(waiting, running) requests right now."""
        with self._lock:
            return max(self._in_flight - self._running, 0), self._running

    def running(self, work: int, fn: Callable[[], T]) -> Callable[[], T]:
        """`fn` wrapped to count as running while it executes and, when it returns, to add
        (work, its duration) to the service-time model."""
        def run() -> T:
            span = self.start_running(work)
            completed = False
            try:
                result = fn()
                completed = True
            finally:
                span.end(completed)
            return result
        return run

    def start_running(self, work: int) -> RunningWork:
        """Count `work` as running from now until `end()` on the result (from any thread); work
        that ran to completion adds (work, its duration) to the service-time model."""
        with self._lock:
            self._running += 1
        return RunningWork(self, work, time.perf_counter())

    def _stopped_running(self) -> None:
        with self._lock:
            self._running -= 1

    def record(self, work: float, seconds: float) -> None:
        with self._lock:
            self.model.add(work, seconds)

    def report(self) -> load_pb2.LoadReport:
        with self._lock:
            rate, overhead = self.model.fit()
            report = load_pb2.LoadReport(
                stage=self.stage, replica_id=self.replica_id, queued_requests=max(self._in_flight - self._running, 0),
                running_requests=self._running, queued_work=self._queued_work, work_per_s=rate,
                overhead_ms=overhead * 1000.0)
        if self.extra is not None:
            self.extra(report)
        return report


class LoadServicer(load_pb2_grpc.LoadServiceServicer):
    """Answers GetLoad for the stages this process serves (one tracker each; the first is the
    process's own stage, reported when the request names none)."""

    def __init__(self, *trackers: LoadTracker) -> None:
        if not trackers:
            raise ValueError("LoadServicer needs at least one tracker")
        self.trackers = {tracker.stage: tracker for tracker in trackers}
        self.default = trackers[0]

    @unary_errors
    async def GetLoad(self, request: load_pb2.GetLoadRequest, context) -> load_pb2.LoadReport:
        tracker = self.trackers.get(request.stage) if request.stage else self.default
        if tracker is None:
            raise NotFoundError(f"stage: this replica serves {', '.join(self.trackers)}, not {request.stage!r}")
        return tracker.report()
