"""Replica pools: each stage's replicas with their health and latest load report.

Invariant: a replica receives new requests only while it is `healthy`. It leaves that state when a
health check, a load poll or a request to it fails with UNAVAILABLE (so a dead replica stops
getting traffic at the first failed call, and at the latest one poll interval after it died), or
when `SLOW_PROBES_TO_REMOVE` probes in a row time out (a replica too busy to answer for a moment
keeps its traffic; a hung one leaves within a few seconds), and returns to it only when a health
check answers SERVING again. `outstanding` counts what this router has sent to a replica and not
yet seen finish, so placement reacts to its own decisions between two load reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epdserve.errors import UnavailableError
from epdserve.security import NO_CREDENTIALS, Credentials
from epdserve.transport.channels import aio_channel
from epdserve.v1 import load_pb2, load_pb2_grpc

log = logging.getLogger(__name__)
MIN_PROBE_TIMEOUT_S = 1.0
SLOW_PROBES_TO_REMOVE = 3


@dataclasses.dataclass
class Replica:
    index: int                   # stable id within its pool (never reused)
    address: str
    channel: grpc.aio.Channel
    stub: object
    healthy: bool = True         # optimistic until the first probe says otherwise
    load: load_pb2.LoadReport | None = None
    reported_at: float = 0.0     # time.monotonic() of `load`
    outstanding: int = 0         # requests this router sent and has not seen finish
    outstanding_work: int = 0    # their work units (images, prompt tokens)
    removed: bool = False        # no longer a member (discovery dropped it); closed once idle
    slow_probes: int = 0         # probes in a row that timed out
    health_stub: object = None
    load_stub: object = None


class ReplicaPool:
    """One stage's replicas. `start()` begins polling health (grpc.health.v1, the stage's service
    name) and load (LoadService.GetLoad) every `interval_s`; `set_addresses` changes the members
    (service discovery); `close()` stops polling and closes the channels."""

    def __init__(self, stage: str, service_name: str, addresses: Sequence[str], stub_cls, *,
                 interval_s: float = 0.5, credentials: Credentials = NO_CREDENTIALS) -> None:
        self.stage, self.service_name, self.interval_s = stage, service_name, interval_s
        self.credentials = credentials
        self.stub_cls = stub_cls
        self.replicas: list[Replica] = []
        self._by_index: dict[int, Replica] = {}
        self._next_index = 0
        self._poller: asyncio.Task | None = None
        self._closers: set[asyncio.Task] = set()
        for address in addresses:
            self._add(address, healthy=True)

    def __len__(self) -> int:
        return len(self.replicas)

    def get(self, index: int) -> Replica:
        """The replica with this id (also a removed one, while requests still hold it)."""
        return self._by_index[index]

    def healthy(self, exclude: Sequence[Replica] = ()) -> list[Replica]:
        """The replicas that may take new work (minus `exclude`); raises UnavailableError if none."""
        found = [r for r in self.replicas if r.healthy and r not in exclude]
        if not found:
            raise UnavailableError(f"no healthy {self.stage} replica")
        return found

    def mark_down(self, replica: Replica, reason: str) -> None:
        if replica.healthy:
            log.warning("%s replica %d (%s) removed: %s", self.stage, replica.index, replica.address, reason)
        replica.healthy = False

    @contextlib.contextmanager
    def track(self, replica: Replica, work: int = 0) -> Iterator[Replica]:
        """Count a request sent to `replica` until the block exits."""
        replica.outstanding += 1
        replica.outstanding_work += work
        try:
            yield replica
        finally:
            replica.outstanding -= 1
            replica.outstanding_work -= work

    # ---- membership ----------------------------------------------------------------------------------
    def set_addresses(self, addresses: Sequence[str]) -> None:
        """Make `addresses` the members: new ones join unhealthy until their first probe answers
        SERVING (probed at once when polling runs); gone ones stop taking work at once and their
        channel closes when their last request has finished."""
        wanted = list(dict.fromkeys(addresses))
        for replica in [r for r in self.replicas if r.address not in wanted]:
            self.replicas.remove(replica)
            replica.removed, replica.healthy = True, False
            log.warning("%s replica %d (%s) left the pool", self.stage, replica.index, replica.address)
            self._close_when_idle(replica)
        current = {r.address for r in self.replicas}
        for address in wanted:
            if address not in current:
                replica = self._add(address, healthy=False)
                log.warning("%s replica %d (%s) joined the pool", self.stage, replica.index, address)
                if self._poller is not None:
                    self._spawn(self._probe(replica))

    def _add(self, address: str, *, healthy: bool) -> Replica:
        channel = aio_channel(address, credentials=self.credentials)
        replica = Replica(self._next_index, address, channel, self.stub_cls(channel), healthy=healthy)
        replica.health_stub = health_pb2_grpc.HealthStub(channel)
        replica.load_stub = load_pb2_grpc.LoadServiceStub(channel)
        self._next_index += 1
        self.replicas.append(replica)
        self._by_index[replica.index] = replica
        return replica

    def _close_when_idle(self, replica: Replica) -> None:
        async def close() -> None:
            while replica.outstanding:
                await asyncio.sleep(self.interval_s)
            await replica.channel.close()
            self._by_index.pop(replica.index, None)

        self._spawn(close())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    # ---- polling ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._poller is None:
            await self.poll_once()
            self._poller = asyncio.create_task(self._poll_forever(), name=f"{self.stage}-replica-poller")

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._probe(r) for r in self.replicas))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.poll_once()

    async def _probe(self, replica: Replica) -> None:
        timeout = max(self.interval_s, MIN_PROBE_TIMEOUT_S)
        try:
            status = await replica.health_stub.Check(
                health_pb2.HealthCheckRequest(service=self.service_name), timeout=timeout)
            if status.status != health_pb2.HealthCheckResponse.SERVING:
                self.mark_down(replica, f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)}")
                return
            load = await replica.load_stub.GetLoad(load_pb2.GetLoadRequest(stage=self.stage), timeout=timeout)
        except grpc.RpcError as exc:
            self._probe_failed(replica, exc.code())
            return
        replica.slow_probes = 0
        replica.load, replica.reported_at = load, time.monotonic()
        if not replica.healthy and not replica.removed:
            log.warning("%s replica %d (%s) re-admitted", self.stage, replica.index, replica.address)
            replica.healthy = True

    def _probe_failed(self, replica: Replica, code: grpc.StatusCode) -> None:
        if code != grpc.StatusCode.DEADLINE_EXCEEDED:
            self.mark_down(replica, f"probe failed: {code.name}")
            return
        replica.slow_probes += 1
        if replica.slow_probes >= SLOW_PROBES_TO_REMOVE:
            self.mark_down(replica, f"{replica.slow_probes} probes in a row timed out")
        elif replica.healthy:
            log.info("%s replica %d (%s): probe timed out (%d of %d before removal)", self.stage, replica.index,
                     replica.address, replica.slow_probes, SLOW_PROBES_TO_REMOVE)

    async def close(self) -> None:
        tasks = [*self._closers, *([self._poller] if self._poller is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._poller = None
        await asyncio.gather(*(r.channel.close() for r in self._by_index.values()))
