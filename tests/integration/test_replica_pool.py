"""The router's replica pools against real grpc.aio servers on loopback (health + LoadService):
load reports arrive, a replica whose health turns NOT_SERVING or whose process stops leaves the
pool within a poll interval or two, and comes back when healthy again; with none left the pool
says UNAVAILABLE."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from epdserve.errors import UnavailableError
from epdserve.v1 import load_pb2_grpc, prefill_pb2_grpc
from services.load import LoadServicer, LoadTracker
from services.router.pools import ReplicaPool

pytestmark = pytest.mark.integration
SERVICE = "epdserve.v1.PrefillService"
INTERVAL = 0.1


class SlowHealth(health.aio.HealthServicer):
    """The standard health service, answering each check `delay_s` late (a busy or hung replica)."""

    delay_s = 0.0

    async def Check(self, request, context):
        await asyncio.sleep(self.delay_s)
        return await super().Check(request, context)


class FakeReplica:
    """A loopback server with the standard health service and a LoadService."""

    def __init__(self, replica_id: str) -> None:
        self.tracker = LoadTracker("prefill", replica_id)
        self.health = SlowHealth()
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> "FakeReplica":
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        load_pb2_grpc.add_LoadServiceServicer_to_server(LoadServicer(self.tracker), self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port or self.port}")
        await self.server.start()
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        return self

    async def stop(self) -> None:
        await self.server.stop(grace=None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def _until(predicate, timeout_s: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "condition not reached in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture
async def replicas():
    started = [await FakeReplica(f"r{i}").start() for i in range(2)]
    yield started
    for replica in started:
        await replica.stop()


@pytest.fixture
async def pool(replicas):
    pool = ReplicaPool("prefill", SERVICE, [r.address for r in replicas], prefill_pb2_grpc.PrefillServiceStub,
                       interval_s=INTERVAL)
    await pool.start()
    yield pool
    await pool.close()


async def test_load_reports_arrive_with_the_replicas_counts(replicas, pool):
    assert [r.load.replica_id for r in pool.replicas] == ["r0", "r1"]
    with replicas[1].tracker.request(300):
        await _until(lambda: pool.replicas[1].load.queued_work == 300, 2.0)
        assert pool.replicas[1].load.queued_requests == 1
    replicas[1].tracker.record(300, 0.1)
    replicas[1].tracker.record(600, 0.2)
    await _until(lambda: pool.replicas[1].load.work_per_s > 0, 2.0)
    assert pool.replicas[1].load.work_per_s == pytest.approx(3000.0)


async def test_not_serving_leaves_the_pool_and_serving_brings_it_back(replicas, pool):
    await replicas[0].health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    await _until(lambda: not pool.replicas[0].healthy, 3 * INTERVAL + 1.0)
    assert pool.healthy() == [pool.replicas[1]]
    await replicas[0].health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await _until(lambda: pool.replicas[0].healthy, 3 * INTERVAL + 1.0)


async def test_a_stopped_replica_is_removed_within_seconds_and_readmitted_on_restart(replicas, pool):
    await replicas[0].stop()
    removed_after = await _until(lambda: not pool.replicas[0].healthy, 3.0)
    assert removed_after < 2.0
    await replicas[0].start(port=replicas[0].port)  # the same address comes back
    await _until(lambda: pool.replicas[0].healthy, 5.0)


async def test_a_replica_too_busy_to_answer_a_probe_keeps_its_traffic_and_a_hung_one_leaves(replicas, pool):
    """A probe timing out once or twice (a replica busy for a moment) leaves it in the pool; one
    that keeps timing out leaves after SLOW_PROBES_TO_REMOVE probes, a few seconds."""
    replica = pool.replicas[0]
    was_removed = []

    async def watch():
        while True:
            was_removed.append(not replica.healthy)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    replicas[0].health.delay_s = 1.5          # past the 1 s probe timeout
    await _until(lambda: replica.slow_probes >= 1, 3.0)
    replicas[0].health.delay_s = 0.0
    await _until(lambda: replica.slow_probes == 0, 3.0)
    watcher.cancel()
    assert not any(was_removed)
    replicas[0].health.delay_s = 30.0         # hung
    removed_after = await _until(lambda: not replica.healthy, 8.0)
    assert 2.0 < removed_after < 6.0 and pool.healthy() == [pool.replicas[1]]
    replicas[0].health.delay_s = 0.0
    await _until(lambda: replica.healthy, 5.0)


async def test_no_healthy_replica_is_unavailable(replicas, pool):
    for replica in pool.replicas:
        pool.mark_down(replica, "test")
    with pytest.raises(UnavailableError, match="no healthy prefill replica"):
        pool.healthy()
    await _until(lambda: all(r.healthy for r in pool.replicas), 3 * INTERVAL + 1.0)  # probes re-admit them


async def test_discovery_changes_the_members_probing_newcomers_and_closing_leavers(replicas):
    pool = ReplicaPool("prefill", SERVICE, [], prefill_pb2_grpc.PrefillServiceStub, interval_s=INTERVAL)
    await pool.start()
    try:
        with pytest.raises(UnavailableError):
            pool.healthy()
        pool.set_addresses([r.address for r in replicas])
        assert [r.healthy for r in pool.replicas] == [False, False]  # until a probe says SERVING
        await _until(lambda: sum(r.healthy for r in pool.replicas) == 2, 2.0)
        leaving = pool.replicas[0]
        with pool.track(leaving, 10):  # a request still running there
            pool.set_addresses([replicas[1].address])
            assert pool.healthy() == [pool.replicas[0]] and pool.replicas[0].address == replicas[1].address
            assert leaving.removed and pool.get(leaving.index) is leaving
            await asyncio.sleep(3 * INTERVAL)
            assert pool.get(leaving.index) is leaving  # not closed under a running request
        await _until(lambda: leaving.index not in pool._by_index, 2.0)
        pool.set_addresses([r.address for r in replicas])  # it comes back under a new id
        await _until(lambda: len([r for r in pool.replicas if r.healthy]) == 2, 2.0)
        assert {r.index for r in pool.replicas} == {1, 2}
    finally:
        await pool.close()
