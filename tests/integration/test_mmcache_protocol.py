"""mmcache against a real redis-server and real servers on loopback: publish, discover, read in
place or over the data channel, leases and release, integrity, owner death, Redis failure,
layer-wise readiness."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import struct
import sys
import time

import grpc
import pytest
import redis.asyncio as aioredis
import torch

from epdserve.config import CacheConfig
from epdserve.redis_server import PrivateRedis
from epdserve.v1 import cache_pb2, cache_pb2_grpc
from mmcache.client import CacheIdentity, MMCache, SyncMMCache
from mmcache.codec import CorruptEntryError
from mmcache.keys import prefix_block_keys
from mmcache.transfer import MAGIC, NONCE_BYTES, VERSION, DataClient

pytestmark = pytest.mark.integration


class Owner:
    """An MMCache with a real gRPC server serving its CacheControl service."""

    @classmethod
    async def start(cls, config: CacheConfig, name: str):
        self = cls()
        self.server = grpc.aio.server()
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.cache = await MMCache.open(config, CacheIdentity(name, f"127.0.0.1:{port}"))
        cache_pb2_grpc.add_CacheControlServicer_to_server(self.cache.servicer(), self.server)
        await self.server.start()
        return self

    async def stop(self):
        await self.cache.close()
        await self.server.stop(None)


@pytest.fixture
def config(redis_url, namespace, tmp_path):
    return CacheConfig(redis_url=redis_url, namespace=namespace, shm_dir=str(tmp_path / "a"),
                       capacity_bytes=64 << 20, heartbeat_interval_s=0.2)


def _other(config, tmp_path, name="b", **overrides):
    return dataclasses.replace(config, shm_dir=str(tmp_path / name), **overrides)


async def test_same_host_read_in_place_is_zero_copy_under_a_lease(config, tmp_path):
    owner = await Owner.start(config, "owner")
    consumer = await MMCache.open(_other(config, tmp_path), CacheIdentity("consumer", ""))
    tensors = [torch.randn(3, 4), torch.randn(2, 2).to(torch.bfloat16)]
    refs = await owner.cache.put_many([("img:a", tensors[0]), ("img:b", tensors[1])], ttl_s=60, lease_s=60)
    assert all(r.lease_id and r.tier == "host" for r in refs)
    got = await consumer.get_many(refs)
    assert all(torch.equal(g, t) for g, t in zip(got, tensors))
    assert consumer.metrics.value("bytes_read_local") > 0 and consumer.metrics.value("bytes_read_remote") == 0
    await consumer.release(refs)
    assert owner.cache.stats().leases == 0
    await consumer.close(), await owner.stop()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_data_channel_between_hosts(config, tmp_path, dtype):
    owner = await Owner.start(dataclasses.replace(config, fetch_chunk_bytes=1000), "owner")
    consumer = await MMCache.open(_other(config, tmp_path, prefer_shared_memory=False), CacheIdentity("c", ""))
    tensor = torch.randn(33, 77).to(dtype)  # many frames, the last one partial
    ref = await owner.cache.put("kv:x:0", tensor, ttl_s=60)
    (got,) = await consumer.get_many([ref])
    assert torch.equal(got, tensor)
    assert consumer.metrics.value("bytes_read_remote") == tensor.numel() * tensor.element_size()
    await consumer.close(), await owner.stop()


async def test_damaged_bytes_are_a_miss_never_a_crash(config, tmp_path):
    owner = await Owner.start(config, "owner")
    ref = await owner.cache.put("img:c", torch.arange(64, dtype=torch.float32), ttl_s=60, lease_s=60)
    with open(ref.path, "r+b") as f:
        f.seek(ref.offset + 5)
        f.write(b"\xff")
    for prefer_shm in (True, False):  # in place (then the owner's copy), and over the data channel
        consumer = await MMCache.open(_other(config, tmp_path, prefer_shared_memory=prefer_shm),
                                      CacheIdentity(f"c{prefer_shm}", ""))
        assert await consumer.get_many([ref]) == [None]
        assert consumer.metrics.value("corrupt") >= 1
        await consumer.close()
    await owner.stop()


async def test_ref_that_does_not_match_is_a_miss(config, tmp_path):
    owner = await Owner.start(config, "owner")
    consumer = await MMCache.open(_other(config, tmp_path), CacheIdentity("c", ""))
    ref = await owner.cache.put("img:d", torch.ones(2, 3), ttl_s=60, lease_s=60)
    for field, value in (("checksum", "xxh3_128:00"), ("nbytes", 4)):
        bad = cache_ref(ref, **{field: value})
        assert await consumer.get_many([bad]) == [None]
    await consumer.close(), await owner.stop()


def cache_ref(ref, **fields):
    copy = type(ref)()
    copy.CopyFrom(ref)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy


@pytest.mark.parametrize("prefer_shm", [True, False])
async def test_release_frees_an_ephemeral_hand_off(config, tmp_path, prefer_shm):
    owner = await Owner.start(config, "owner")
    consumer = await MMCache.open(_other(config, tmp_path, prefer_shared_memory=prefer_shm), CacheIdentity("c", ""))
    refs = await owner.cache.put_many([(f"kv:r:{i}", torch.ones(8)) for i in range(3)], ttl_s=60, lease_s=60,
                                      ephemeral=True)
    assert all(t is not None for t in await consumer.get_many(refs))
    await consumer.release(refs)  # through the owner's Release RPC
    assert owner.cache.store.keys() == []
    assert await owner.cache.lookup_many([r.key for r in refs]) == [None, None, None]
    await consumer.close(), await owner.stop()


async def test_unreleased_hand_off_is_freed_when_its_lease_expires(config):
    owner = await Owner.start(config, "owner")
    await owner.cache.put("kv:t:0", torch.ones(4), ttl_s=60, lease_s=0.3, ephemeral=True)
    await asyncio.sleep(1.0)  # lease deadline + a maintenance pass
    assert owner.cache.store.keys() == []
    assert await owner.cache.lookup_many(["kv:t:0"]) == [None]
    await owner.stop()


async def test_lookup_refreshes_ttl_and_leases_across_owners(config, tmp_path):
    owner = await Owner.start(config, "owner")
    other = await Owner.start(_other(config, tmp_path), "other")
    await owner.cache.put("img:l", torch.ones(2), ttl_s=5)
    (ref,) = await other.cache.lookup_many(["img:l"], ttl_s=100, lease_s=30)
    assert ref is not None and ref.lease_id and ref.owner == "owner"
    assert await owner.cache.redis.pttl(owner.cache.index.entry_key("img:l")) > 5000
    assert owner.cache.stats().leases == 1
    assert torch.equal((await other.cache.get_many([ref]))[0], torch.ones(2))
    await other.cache.release([ref])
    assert owner.cache.stats().leases == 0
    owner.cache.store.delete("img:l")  # bytes gone behind the index's back: a stale entry
    assert await other.cache.lookup_many(["img:l"], lease_s=30) == [None]
    await other.stop(), await owner.stop()


async def test_longest_prefix_stops_at_the_first_miss(config):
    owner = await Owner.start(config, "owner")
    keys = prefix_block_keys(list(range(40)), 8, model_revision="r", kv_settings="f32")
    await owner.cache.put_many([(keys[0], torch.ones(1)), (keys[1], torch.ones(1)), (keys[3], torch.ones(1))],
                               ttl_s=60)
    run = await owner.cache.longest_prefix(keys, lease_s=30)
    assert [r.key for r in run] == keys[:2]
    assert owner.cache.stats().leases == 2          # only the run is leased; keys[3] was let go
    await owner.cache.release(run)
    await owner.stop()


_OWNER_PROCESS = """
import asyncio, sys, time, torch
from epdserve.config import CacheConfig
import mmcache.client
from mmcache.client import CacheIdentity, MMCache

redis_url, namespace, shm_dir, name, host, blocked_s = sys.argv[1:7]
if host:
    mmcache.client.local_host_id = lambda: host   # another host: no same-host rule can keep it

async def main():
    config = CacheConfig(redis_url=redis_url, namespace=namespace, shm_dir=shm_dir,
                         capacity_bytes=1 << 20, heartbeat_interval_s=0.2)
    cache = await MMCache.open(config, CacheIdentity(name, ""))
    await cache.put(f"img:{name}", torch.ones(2), ttl_s=600)
    print("ready", flush=True)
    if float(blocked_s):
        await asyncio.sleep(0.5)
        print("blocking", flush=True)
        time.sleep(float(blocked_s))   # the event loop blocked, as a model load or a compile blocks it
        print("unblocked", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def _owner_process(config, shm_dir, name: str = "other", host: str = "", blocked_s: float = 0.0):
    """Another process owning the entry img:<name> (on `host`, when given, rather than this one;
    blocking its event loop for `blocked_s` after printing "blocking")."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _OWNER_PROCESS, config.redis_url, config.namespace, str(shm_dir), name, host,
        str(blocked_s), stdout=asyncio.subprocess.PIPE)
    line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
    assert line.strip() == b"ready"
    return process


async def _wait_for(condition, message: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.1)


async def test_a_stalled_owner_is_kept_and_a_killed_one_is_forgotten(config, tmp_path):
    """Another process owns an entry. Stopped (SIGSTOP: a blocked event loop, as a long model load
    makes one), it misses its heartbeats: lookups stop returning its entry, but the janitor keeps
    its index entries and its pool file, since its process still holds the pool; resumed, it serves
    the entry again. Killed (SIGKILL, no close), the janitor removes both."""
    process = await _owner_process(config, tmp_path / "other")
    pool_file = next((tmp_path / "other").glob("pool-other.shm"))
    survivor = await Owner.start(config, "survivor")
    entry_key = survivor.cache.index.entry_key("img:other")
    try:
        assert (await survivor.cache.lookup_many(["img:other"]))[0] is not None
        process.send_signal(signal.SIGSTOP)
        await _wait_for(lambda: _is_none(survivor.cache.lookup_many(["img:other"])),
                        "a silent owner's entry is still offered")
        await asyncio.sleep(2.0)  # ten heartbeat periods: two janitor rounds
        assert pool_file.exists() and await survivor.cache.redis.exists(entry_key), \
            "the janitor removed a live owner's pool or entries"
        process.send_signal(signal.SIGCONT)
        await _wait_for(lambda: _is_not_none(survivor.cache.lookup_many(["img:other"])),
                        "a resumed owner's entry is not offered again")
        (ref,) = await survivor.cache.lookup_many(["img:other"])
        (tensor,) = await survivor.cache.get_many([ref])
        assert torch.equal(tensor, torch.ones(2)) and survivor.cache.metrics.value("bytes_read_local") > 0
        process.kill()
        await process.wait()
        await _wait_for(lambda: _gone(pool_file, survivor.cache.redis, entry_key),
                        "the janitor did not clean up after the killed owner")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await survivor.stop()


async def test_an_owner_on_another_host_whose_event_loop_is_blocked_keeps_its_entries(config, tmp_path):
    """An owner elsewhere whose event loop is blocked for ten heartbeat TTLs misses its event-loop
    heartbeats: lookups stop offering its entry. Its process still runs, and its thread keeps
    beating, so the janitor keeps its index entries (only its own host could check its pool file).
    Once unblocked its entry is offered again; killed, it is dropped."""
    blocked_s = 6.0
    process = await _owner_process(config, tmp_path / "remote", "remote", "another-host/1", blocked_s)
    janitor = await Owner.start(config, "janitor")
    entry_key = janitor.cache.index.entry_key("img:remote")
    try:
        assert await asyncio.wait_for(process.stdout.readline(), timeout=10) == b"blocking\n"
        await _wait_for(lambda: _is_none(janitor.cache.lookup_many(["img:remote"])),
                        "a blocked owner's entry is still offered", timeout_s=3.0)
        assert await janitor.cache.registry.collect_dead() == []
        assert await janitor.cache.redis.exists(entry_key), "the janitor dropped a blocked owner's entries"
        assert await asyncio.wait_for(process.stdout.readline(), timeout=blocked_s + 10) == b"unblocked\n"
        await _wait_for(lambda: _is_not_none(janitor.cache.lookup_many(["img:remote"])),
                        "an unblocked owner's entry is not offered again")
        process.kill()
        await process.wait()

        async def dropped() -> bool:
            await janitor.cache.registry.collect_dead()
            return not await janitor.cache.redis.exists(entry_key)
        await _wait_for(dropped, "the killed owner's entries were kept")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await janitor.stop()


async def _is_none(lookup) -> bool:
    return (await lookup)[0] is None


async def _is_not_none(lookup) -> bool:
    return (await lookup)[0] is not None


async def _gone(path, redis, key) -> bool:
    return not path.exists() and not await redis.exists(key)


async def test_close_removes_everything(config, tmp_path):
    owner = await Owner.start(config, "owner")
    await owner.cache.put_many([("img:x", torch.ones(2)), ("kv:y:0", torch.ones(2))], ttl_s=60)
    await owner.stop()
    redis = aioredis.from_url(config.redis_url)
    assert [k async for k in redis.scan_iter(match=f"{config.namespace}:*")] == []
    await redis.aclose()
    assert not (tmp_path / "a").exists()


async def test_data_channel_validates_and_detects_framing_errors(config):
    owner = await Owner.start(config, "owner")
    client = DataClient(timeout_s=5)
    address = owner.cache.owner.data_address
    with pytest.raises(CorruptEntryError, match="refused"):
        await client.fetch(address, "../../etc/passwd")
    assert await client.fetch(address, "img:nothere") is None
    client.close()
    await owner.stop()
    for frames, error in ((b"\x01\x00\x00\x00\x01\x00\x00\x00x", "frame 1 arrived where frame 0"),
                          (b"\x00\x00\x00\x00\x09\x00\x00\x00xxxxxxxxx", "overflow"),
                          (b"\x00\x00\x00\x00\x02\x00\x00\x00xx\x01\x00\x00\x00\x00\x00\x00\x00", "ended after 2")):
        with pytest.raises(CorruptEntryError, match=error):
            await _fetch_from_fake_owner(frames)


async def _fetch_from_fake_owner(frames: bytes):
    """A data-channel peer that answers with a given (broken) frame sequence for a 4-byte entry."""
    header = b'{"dtype":"uint8","shape":[4],"nbytes":4,"checksum":"x"}'

    async def handle(reader, writer):
        writer.write(MAGIC + bytes([VERSION, 0]) + bytes(NONCE_BYTES))  # the greeting: no token wanted
        await reader.readexactly(5)
        for _ in range(2):
            await reader.readexactly(struct.unpack("<H", await reader.readexactly(2))[0])
        writer.write(b"\x00" + struct.pack("<I", len(header)) + header + frames)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await DataClient(timeout_s=5).fetch(f"127.0.0.1:{port}", "img:x")
    finally:
        server.close()
        await server.wait_closed()


async def test_data_channel_rejects_a_non_protocol_peer(config):
    owner = await Owner.start(config, "owner")
    host, port = owner.cache.owner.data_address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    greeting = await reader.readexactly(len(MAGIC) + 2 + NONCE_BYTES)
    assert greeting.startswith(MAGIC + bytes([VERSION]))
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    await writer.drain()
    try:  # then the owner hangs up without serving anything (EOF, or a reset: it did not read the rest)
        assert await asyncio.wait_for(reader.read(16), 5) == b""
    except ConnectionResetError:
        pass
    writer.close()
    assert MAGIC == b"EPDX" and VERSION == 2
    await owner.stop()


async def test_malformed_index_header_is_a_miss(config):
    owner = await Owner.start(config, "owner")
    await owner.cache.redis.set(owner.cache.index.entry_key("img:bad"), "{not json")
    await owner.cache.redis.set(owner.cache.index.entry_key("img:bad2"), '{"o":"owner"}')
    await owner.cache.put("img:good", torch.ones(1), ttl_s=60)
    refs = await owner.cache.lookup_many(["img:bad", "img:bad2", "img:good", "img:none"])
    assert [r is not None for r in refs] == [False, False, True, False]
    await owner.stop()


async def test_lookup_is_one_round_trip(config):
    owner = await Owner.start(config, "owner")
    keys = [f"img:{i}" for i in range(200)]
    await owner.cache.put_many([(k, torch.ones(1)) for k in keys], ttl_s=60)
    for task in owner.cache._tasks:  # no heartbeats in the middle of the count
        task.cancel()
    await owner.cache.lookup_many(keys[:1])  # the first call also loads the script into Redis
    calls = _count_round_trips(owner.cache.redis)
    refs = await owner.cache.lookup_many(keys, ttl_s=60)
    assert all(r is not None for r in refs)
    assert calls == ["EVALSHA"]  # one script call for 200 keys (header + owner liveness + TTL refresh)
    await owner.stop()


def _count_round_trips(redis) -> list[str]:
    calls: list[str] = []
    execute, pipeline = redis.execute_command, redis.pipeline

    async def counted_execute(*args, **kwargs):
        calls.append(str(args[0]))
        return await execute(*args, **kwargs)

    def counted_pipeline(*args, **kwargs):
        pipe = pipeline(*args, **kwargs)
        run = pipe.execute

        async def counted_run(*a, **k):
            calls.append("PIPELINE")
            return await run(*a, **k)

        pipe.execute = counted_run
        return pipe

    redis.execute_command, redis.pipeline = counted_execute, counted_pipeline
    return calls


async def test_redis_dies_and_returns(tmp_path, namespace):
    """Redis killed mid-traffic: lookups miss fast, hand-offs keep working (refs carry the
    location), the availability gauge drops to 0; after a restart on the same port it goes back
    to 1, the owner re-registers, and hits come back."""
    with PrivateRedis() as server:
        config = CacheConfig(redis_url=server.url, namespace=namespace, shm_dir=str(tmp_path / "a"),
                             capacity_bytes=16 << 20, heartbeat_interval_s=0.2, redis_timeout_s=0.5)
        owner = await Owner.start(config, "owner")
        consumer = await MMCache.open(_other(config, tmp_path), CacheIdentity("consumer", ""))
        await owner.cache.put("img:before", torch.ones(3), ttl_s=60)
        assert (await consumer.lookup_many(["img:before"]))[0] is not None
        server.kill()
        started = time.monotonic()
        assert await consumer.lookup_many(["img:before"]) == [None]
        ref = await owner.cache.put("kv:during:0", torch.full((4,), 7.0), ttl_s=60, lease_s=60, ephemeral=True)
        assert torch.equal((await consumer.get_many([ref]))[0], torch.full((4,), 7.0))
        await consumer.release([ref])
        assert time.monotonic() - started < 5, "calls did not fail fast while Redis was away"
        assert consumer.metrics.value("available") == 0 and not consumer.available
        server.restart()
        deadline = time.monotonic() + 15
        while not (owner.cache.available and consumer.available):
            assert time.monotonic() < deadline, "the cache did not reconnect"
            await owner.cache.lookup_many(["img:probe"])
            await asyncio.sleep(0.2)
        await owner.cache.put("img:after", torch.ones(3), ttl_s=60)
        while (await consumer.lookup_many(["img:after"]))[0] is None:  # the owner's heartbeat is back
            assert time.monotonic() < deadline, "hits did not come back"
            await asyncio.sleep(0.2)
        assert consumer.metrics.value("available") == 1
        await consumer.close(), await owner.stop()


async def test_open_while_redis_is_down_starts_degraded(tmp_path):
    config = CacheConfig(redis_url="redis://127.0.0.1:1/0", shm_dir=str(tmp_path / "a"), redis_timeout_s=0.5,
                         capacity_bytes=1 << 20)
    cache = await MMCache.open(config, CacheIdentity("lonely", ""))
    assert not cache.available
    ref = await cache.put("img:z", torch.ones(2), ttl_s=60)
    assert torch.equal((await cache.get_many([ref]))[0], torch.ones(2))
    assert await cache.lookup_many(["img:z"]) == [None]
    await cache.close()


async def test_layer_wise_readiness_overlaps_producer_and_consumer(config, tmp_path):
    """The consumer loads layer 0 while the producer is still computing later layers."""
    producer = await Owner.start(config, "producer")
    consumer = await MMCache.open(_other(config, tmp_path), CacheIdentity("consumer", ""))
    layers, events = 6, []

    async def produce():
        for layer in range(layers):
            await asyncio.sleep(0.1)  # "computing" this layer
            ref = await producer.cache.put(f"kv:p:{layer}", torch.full((8,), float(layer)), ttl_s=60,
                                           lease_s=60, ephemeral=True)
            events.append(("written", layer, time.monotonic()))
            await producer.cache.publish_ready("kv:p", {"layer": str(layer), "ref": ref.SerializeToString().hex()},
                                               ttl_s=60)

    async def consume():
        from epdserve.v1 import common_pb2

        seen = 0
        async for event in consumer.follow_ready("kv:p", timeout_s=5):
            ref = common_pb2.TensorRef.FromString(bytes.fromhex(event["ref"]))
            (tensor,) = await consumer.get_many([ref])
            assert torch.equal(tensor, torch.full((8,), float(event["layer"])))
            await consumer.release([ref])
            events.append(("read", int(event["layer"]), time.monotonic()))
            seen += 1
            if seen == layers:
                return

    await asyncio.gather(produce(), consume())
    first_read = next(t for kind, layer, t in events if kind == "read" and layer == 0)
    last_write = next(t for kind, layer, t in events if kind == "written" and layer == layers - 1)
    assert first_read < last_write
    assert producer.cache.store.keys() == []
    await consumer.close(), await producer.stop()


async def test_stats_rpc(config):
    owner = await Owner.start(config, "owner")
    await owner.cache.put_many([("img:s", torch.ones(4)), ("kv:s:0", torch.ones(4))], ttl_s=60, lease_s=60)
    async with grpc.aio.insecure_channel(owner.cache.owner.control_address) as channel:
        stats = await cache_pb2_grpc.CacheControlStub(channel).Stats(cache_pb2.StatsRequest())
    assert dict(stats.entries_by_kind) == {"img": 1, "kv": 1} and stats.leases == 2
    assert stats.used_bytes["host"] > 0 and stats.index_available
    await owner.stop()


def test_sync_facade(config, tmp_path):
    with SyncMMCache(_other(config, tmp_path), CacheIdentity("sync", "")) as cache:
        ref = cache.put("img:sync", torch.arange(5), ttl_s=60, lease_s=60)
        (got,) = cache.get_many([ref])
        assert torch.equal(got, torch.arange(5))
        cache.release([ref])
        assert cache.lookup_many(["img:sync"])[0] is not None


@pytest.mark.parametrize("numel", [64, 1 << 17])  # checked on the event loop; in worker threads (512 KB)
async def test_put_of_a_held_content_key_keeps_intact_bytes_and_replaces_damaged_ones(config, tmp_path, numel):
    owner = await Owner.start(config, "owner")
    tensor = torch.arange(numel, dtype=torch.float32)
    first = await owner.cache.put("img:h", tensor, ttl_s=60)
    again = await owner.cache.put("img:h", tensor.clone(), ttl_s=60)
    assert (again.path, again.offset) == (first.path, first.offset)   # intact: the held bytes are kept
    with open(first.path, "r+b") as f:
        f.seek(first.offset + 5)
        f.write(b"\xff")
    replaced = await owner.cache.put("img:h", tensor.clone(), ttl_s=60)
    consumer = await MMCache.open(_other(config, tmp_path), CacheIdentity("c", ""))
    (got,) = await consumer.get_many([replaced])
    assert got is not None and torch.equal(got, tensor)               # damaged: replaced with the new bytes
    await consumer.close(), await owner.stop()


@pytest.mark.parametrize("workers", [1, 2, 4])
async def test_a_large_entry_is_copied_in_slices_and_checksummed_from_its_source(config, tmp_path, workers,
                                                                              monkeypatch):
    """An entry of SPLIT_MIN_BYTES or more is spread over the worker threads (one checksums the
    source, the others copy a slice each); whatever the thread count, the pool holds exactly the
    source bytes, the ref's checksum is theirs, and another process reads them back intact."""
    from mmcache import client as client_module
    from mmcache.codec import checksum, tensor_bytes

    monkeypatch.setattr(client_module, "_worker_count", lambda: workers)
    owner = await Owner.start(dataclasses.replace(config, capacity_bytes=96 << 20), "owner")
    consumer = await MMCache.open(_other(config, tmp_path), CacheIdentity("consumer", ""))
    big = torch.randn(client_module.SPLIT_MIN_BYTES // 4 * 3 + 7)   # 24 MiB + 28 bytes: an uneven last slice
    small = torch.randn(1000)
    refs = await owner.cache.put_many([("kv:big", big), ("kv:small", small)], ttl_s=60, lease_s=60)
    assert refs[0].checksum == checksum(tensor_bytes(big)) and refs[1].checksum == checksum(tensor_bytes(small))
    got = await consumer.get_many(refs)
    assert torch.equal(got[0], big) and torch.equal(got[1], small)
    await consumer.release(refs)
    await consumer.close(), await owner.stop()


def test_slices_cover_the_bytes_on_page_boundaries():
    from mmcache.client import _slices

    for nbytes, parts in [(1, 3), (4096, 3), (10 << 20, 3), ((24 << 20) + 28, 1), ((24 << 20) + 28, 3)]:
        cuts = _slices(nbytes, parts)
        assert cuts[0][0] == 0 and cuts[-1][1] == nbytes and len(cuts) <= parts
        assert all(a < b for a, b in cuts) and all(b == c for (_, b), (c, _) in zip(cuts, cuts[1:]))
        assert all(a % 4096 == 0 for a, _ in cuts)


async def test_a_preallocated_pool_owns_its_pages_from_the_start(config):
    owner = await Owner.start(dataclasses.replace(config, preallocate_pool=True), "owner")
    pool_path = owner.cache.store.tiers["host"].pool.path
    assert pool_path.stat().st_blocks * 512 >= config.capacity_bytes   # not a sparse file
    ref = await owner.cache.put("kv:x", torch.arange(10.0), ttl_s=60)
    assert torch.equal((await owner.cache.get_many([ref]))[0], torch.arange(10.0))
    await owner.stop()
