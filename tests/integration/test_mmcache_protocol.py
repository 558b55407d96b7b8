"""mmcache against a real redis-server and real gRPC servers on loopback: publish, read in place,
stream across "hosts", corruption is a miss, release and TTL free the bytes, close cleans up."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
import redis.asyncio as aioredis
import torch

from epdserve.config import CacheConfig
from epdserve.errors import UnavailableError
from epdserve.v1 import cache_pb2, cache_pb2_grpc
from mmcache.client import MMCache, OwnerInfo, SyncMMCache
from mmcache.index import IndexEntry, RedisIndex
from mmcache.keys import index_key

pytestmark = pytest.mark.integration


async def _owner(config: CacheConfig, name: str, host: str = "host-a"):
    """An MMCache with a real gRPC server serving its CacheTransfer."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    cache = await MMCache.open(config, OwnerInfo(name, host, f"127.0.0.1:{port}"))
    cache_pb2_grpc.add_CacheTransferServicer_to_server(cache.servicer(), server)
    await server.start()
    return cache, server


@pytest.fixture
def config(redis_url, namespace, tmp_path):
    return CacheConfig(redis_url=redis_url, namespace=namespace, shm_dir=str(tmp_path / "owner"))


def _consumer_config(config, tmp_path, **overrides):
    return dataclasses.replace(config, shm_dir=str(tmp_path / "consumer"), **overrides)


async def test_put_and_read_in_place_on_the_same_host(config, tmp_path):
    owner, server = await _owner(config, "owner")
    consumer = await MMCache.open(_consumer_config(config, tmp_path), OwnerInfo("consumer", "host-a", ""))
    tensors = [torch.randn(3, 4), torch.randn(2, 2).to(torch.bfloat16)]
    refs = await owner.put_many([("img:a", tensors[0]), ("img:b", tensors[1])], ttl_s=60)
    got = await consumer.get_many(refs)
    assert all(torch.equal(g, t) for g, t in zip(got, tensors))
    assert consumer.stats.bytes_read_local > 0 and consumer.stats.bytes_read_remote == 0
    await consumer.close(), await owner.close(), await server.stop(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_stream_from_another_host(config, tmp_path, dtype):
    owner, server = await _owner(dataclasses.replace(config, fetch_chunk_bytes=1000), "owner")
    consumer = await MMCache.open(_consumer_config(config, tmp_path), OwnerInfo("consumer", "host-b", ""))
    tensor = torch.randn(33, 77).to(dtype)  # several chunks, last one partial
    ref = await owner.put("kv:x:0", tensor, ttl_s=60)
    (got,) = await consumer.get_many([ref])
    assert torch.equal(got, tensor)
    assert consumer.stats.bytes_read_remote == tensor.numel() * tensor.element_size()
    await consumer.close(), await owner.close(), await server.stop(None)


async def test_corrupt_bytes_are_a_miss(config, tmp_path):
    owner, server = await _owner(config, "owner")
    ref = await owner.put("img:c", torch.arange(64, dtype=torch.float32), ttl_s=60)
    path = owner.store.get("img:c").path
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    for host in ("host-a", "host-b"):  # in place and over the stream
        consumer = await MMCache.open(_consumer_config(config, tmp_path), OwnerInfo("c-" + host, host, ""))
        assert await consumer.get_many([ref]) == [None]
        assert consumer.stats.corrupt == 1
        await consumer.close()
    await owner.close(), await server.stop(None)


async def test_missing_or_mismatched_entries_are_misses(config, tmp_path):
    owner, server = await _owner(config, "owner")
    ref = await owner.put("img:d", torch.ones(2, 3), ttl_s=60)
    wrong_shape = cache_ref_with(ref, shape=[3, 2])
    wrong_sum = cache_ref_with(ref, checksum="xxh3_128:00")
    assert await owner.get_many([wrong_shape, wrong_sum]) == [None, None]
    await owner.index.delete_many(["img:d"])
    assert await owner.get_many([ref]) == [None]
    await owner.close(), await server.stop(None)


def cache_ref_with(ref, **fields):
    copy = type(ref)()
    copy.CopyFrom(ref)
    for name, value in fields.items():
        if name == "shape":
            del copy.shape[:]
            copy.shape.extend(value)
        else:
            setattr(copy, name, value)
    return copy


@pytest.mark.parametrize("consumer_host", ["host-a", "host-b"])
async def test_release_frees_the_owners_bytes(config, tmp_path, consumer_host):
    owner, server = await _owner(config, "owner")
    refs = await owner.put_many([(f"kv:r:{i}", torch.ones(8)) for i in range(3)], ttl_s=60)
    consumer = await MMCache.open(_consumer_config(config, tmp_path), OwnerInfo("consumer", consumer_host, ""))
    assert all(t is not None for t in await consumer.get_many(refs))
    await consumer.release(refs)
    assert owner.store.keys() == []
    assert await owner.index.get_many([r.key for r in refs]) == [None, None, None]
    await consumer.close(), await owner.close(), await server.stop(None)


async def test_ttl_frees_bytes_and_index(config):
    owner, server = await _owner(config, "owner")
    ref = await owner.put("kv:t:0", torch.ones(4), ttl_s=0.3)
    ttl_ms = await owner.redis.pttl(index_key(config.namespace, ref.key))
    assert 0 < ttl_ms <= 300
    await asyncio.sleep(1.6)  # index expiry + one sweeper pass
    assert owner.store.keys() == []
    assert await owner.lookup_many([ref.key]) == [None]
    await owner.close(), await server.stop(None)


async def test_lookup_refreshes_ttl_and_drops_stale_own_entries(config):
    owner, server = await _owner(config, "owner")
    await owner.put("img:l", torch.ones(2), ttl_s=5)
    (ref,) = await owner.lookup_many(["img:l"], ttl_s=100)
    assert ref is not None and await owner.redis.pttl(index_key(config.namespace, "img:l")) > 5000
    owner.store.delete("img:l")  # bytes gone behind the index's back
    assert await owner.lookup_many(["img:l"]) == [None]
    assert await owner.index.get_many(["img:l"]) == [None]
    await owner.close(), await server.stop(None)


async def test_close_removes_index_keys_and_directory(config, tmp_path):
    owner, server = await _owner(config, "owner")
    await owner.put_many([("img:x", torch.ones(2)), ("kv:y:0", torch.ones(2))], ttl_s=60)
    await owner.close()
    await server.stop(None)
    redis = aioredis.from_url(config.redis_url)
    assert [k async for k in redis.scan_iter(match=f"{config.namespace}:*")] == []
    await redis.aclose()
    assert not (tmp_path / "owner").exists()


async def test_fetch_validates_keys_and_never_leaks_paths(config):
    owner, server = await _owner(config, "owner")
    async with grpc.aio.insecure_channel(owner.owner.address) as channel:
        stub = cache_pb2_grpc.CacheTransferStub(channel)
        with pytest.raises(grpc.RpcError) as bad:
            async for _ in stub.Fetch(cache_pb2.FetchRequest(key="../../etc/passwd")):
                pass
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as missing:
            async for _ in stub.Fetch(cache_pb2.FetchRequest(key="img:nothere")):
                pass
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert "/dev/shm" not in missing.value.details() and "/tmp" not in missing.value.details()
    await owner.close(), await server.stop(None)


async def test_malformed_index_entry_is_a_miss(config):
    redis = aioredis.from_url(config.redis_url)
    index = RedisIndex(redis, config.namespace)
    await redis.hset(index_key(config.namespace, "img:bad"), mapping={"owner": "x", "shape": "not json"})
    good = IndexEntry("img:good", "o", "h", "a", "/p", "float32", (2,), 8, "xxh3_128:ab", 0.0)
    await index.put_many([good], ttl_s=60)
    assert await index.get_many(["img:bad", "img:good", "img:none"]) == [None, good, None]
    await redis.aclose()


async def test_get_many_is_one_round_trip(config):
    redis = aioredis.from_url(config.redis_url)
    index = RedisIndex(redis, config.namespace)
    entries = [IndexEntry(f"img:{i}", "o", "h", "a", "/p", "float32", (1,), 4, "x", 0.0) for i in range(100)]
    await index.put_many(entries, ttl_s=60)
    calls = []
    original = redis.pipeline

    def counting_pipeline(*args, **kwargs):
        pipe = original(*args, **kwargs)
        execute = pipe.execute

        async def counted():
            calls.append(1)
            return await execute()

        pipe.execute = counted
        return pipe

    redis.pipeline = counting_pipeline
    assert await index.get_many([e.key for e in entries]) == entries
    assert calls == [1]
    await redis.aclose()


async def test_unreachable_redis_is_unavailable(tmp_path):
    config = CacheConfig(redis_url="redis://user:secret@127.0.0.1:1/0", shm_dir=str(tmp_path / "s"),
                         redis_timeout_s=1.0)
    with pytest.raises(UnavailableError, match=r"cannot reach Redis at redis://user:\*\*\*@127.0.0.1:1/0"):
        await MMCache.open(config, OwnerInfo("o", "h", ""))


def test_sync_facade(config, tmp_path):
    with SyncMMCache(_consumer_config(config, tmp_path), OwnerInfo("sync", "host-a", "")) as cache:
        ref = cache.put("img:sync", torch.arange(5), ttl_s=60)
        (got,) = cache.get_many([ref])
        assert torch.equal(got, torch.arange(5))
        cache.release([ref])
        assert cache.lookup_many(["img:sync"]) == [None]
