"""Replica pools: each stage's replicas with their health and latest load report.

Invariant: a replica receives new requests only while it is `healthy`. It leaves that state when a
health check, a load poll or a request to it fails with UNAVAILABLE (so a dead replica stops
getting traffic at the first failed call, and at the latest one poll interval after it died), and
returns to it only when a health check answers SERVING again. `outstanding` counts what this router
has sent to a replica and not yet seen finish, so placement reacts to its own decisions between
two load reports.
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
from epdserve.transport.channels import aio_channel
from epdserve.v1 import load_pb2, load_pb2_grpc

log = logging.getLogger(__name__)
MIN_PROBE_TIMEOUT_S = 1.0


@dataclasses.dataclass
class Replica:
    index: int
    address: str
    channel: grpc.aio.Channel
    stub: object
    healthy: bool = True         # optimistic until the first probe says otherwise
    load: load_pb2.LoadReport | None = None
    reported_at: float = 0.0     # time.monotonic() of `load`
    outstanding: int = 0         # requests this router sent and has not seen finish
    outstanding_work: int = 0    # their work units (images, prompt tokens)


class ReplicaPool:
    """One stage's replicas. `start()` begins polling health (grpc.health.v1, the stage's service
    name) and load (LoadService.GetLoad) every `interval_s`; `close()` stops it and closes the
    channels."""

    def __init__(self, stage: str, service_name: str, addresses: Sequence[str], stub_cls, *,
                 interval_s: float = 0.5) -> None:
        self.stage, self.service_name, self.interval_s = stage, service_name, interval_s
        self.replicas: list[Replica] = []
        for i, address in enumerate(addresses):
            channel = aio_channel(address)
            self.replicas.append(Replica(i, address, channel, stub_cls(channel)))
        self._health = [health_pb2_grpc.HealthStub(r.channel) for r in self.replicas]
        self._load = [load_pb2_grpc.LoadServiceStub(r.channel) for r in self.replicas]
        self._poller: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self.replicas)

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

    # ---- polling ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._poller is None and self.replicas:
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
            status = await self._health[replica.index].Check(
                health_pb2.HealthCheckRequest(service=self.service_name), timeout=timeout)
            if status.status != health_pb2.HealthCheckResponse.SERVING:
                self.mark_down(replica, f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)}")
                return
            load = await self._load[replica.index].GetLoad(load_pb2.GetLoadRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            self.mark_down(replica, f"probe failed: {exc.code().name}")
            return
        replica.load, replica.reported_at = load, time.monotonic()
        if not replica.healthy:
            log.warning("%s replica %d (%s) re-admitted", self.stage, replica.index, replica.address)
            replica.healthy = True

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        await asyncio.gather(*(r.channel.close() for r in self.replicas))
