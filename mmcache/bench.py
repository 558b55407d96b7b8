"""`epdserve bench cache`: how fast mmcache moves bytes, against a memcpy baseline of the same run.

64 MiB of KV in 2 MiB blocks, produced by a separate process (its own MMCache) and consumed here:
  memcpy_gbps     numpy copy of a 64 MiB buffer (the ceiling of this machine)
  shm_gbps        producer put (copy + checksum + index write) -> consumer lookup + in-place read
                  + checksum verify, end to end, same host
  stream_gbps     consumer pulls the same blocks over the owner's data channel (TCP loopback)
  index_ops_per_s pipelined index lookups (one Lua call per 1000 keys) against the real redis-server
Each number is the median of `repeats` runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np

TOTAL_BYTES = 64 << 20
BLOCK_BYTES = 2 << 20


def memcpy_gbps(repeats: int) -> float:
    src = np.random.randint(0, 255, TOTAL_BYTES, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return TOTAL_BYTES / statistics.median(times) / 1e9


async def _consumer(redis_url: str, namespace: str, prefer_shm: bool, store_dir: str):
    from epdserve.config import CacheConfig
    from mmcache.client import CacheIdentity, MMCache

    config = CacheConfig(redis_url=redis_url, namespace=namespace, shm_dir=store_dir, capacity_bytes=8 << 20,
                         prefer_shared_memory=prefer_shm)
    return await MMCache.open(config, CacheIdentity(f"bench-consumer-{uuid.uuid4().hex[:6]}", ""))


class Producer:
    """The producing owner, in its own process, driven over stdin/stdout."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mmcache.bench", "producer", redis_url, namespace],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.ask("ping") == "ready"

    def ask(self, command: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        self.ask("quit")
        self.process.wait(timeout=30)


async def _shm_round(producer: Producer, consumer, round_id: int) -> float:
    from epdserve.v1 import common_pb2

    start = time.perf_counter()
    keys = json.loads(producer.ask(f"put {round_id}"))
    refs = await consumer.lookup_many(keys, lease_s=60)
    assert all(isinstance(r, common_pb2.TensorRef) for r in refs), "a block was not found"
    tensors = await consumer.get_many(refs)
    elapsed = time.perf_counter() - start
    assert all(t is not None for t in tensors), "a block was not readable"
    await consumer.release(refs)
    return elapsed


async def _stream_round(producer: Producer, consumer, round_id: int) -> float:
    keys = json.loads(producer.ask(f"put {round_id}"))
    refs = await consumer.lookup_many(keys, lease_s=60)
    assert all(r is not None for r in refs), "a block was not found"
    start = time.perf_counter()
    tensors = await consumer.get_many(refs)
    elapsed = time.perf_counter() - start
    assert all(t is not None for t in tensors), "a block was not readable"
    await consumer.release(refs)
    return elapsed


async def _index_ops(consumer, keys: list[str], repeats: int) -> float:
    await consumer.index.get_many(keys)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        await consumer.index.get_many(keys)
        times.append(time.perf_counter() - start)
    return len(keys) / statistics.median(times)


async def _measure(redis_url: str, repeats: int) -> dict:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    producer = Producer(redis_url, namespace)
    with tempfile.TemporaryDirectory(prefix="epdserve-bench-") as tmp:
        shm = await _consumer(redis_url, namespace, True, f"{tmp}/a")
        stream = await _consumer(redis_url, namespace, False, f"{tmp}/b")
        try:
            await _shm_round(producer, shm, -1)  # warm-up: page faults, connections, script load
            shm_times = [await _shm_round(producer, shm, i) for i in range(repeats)]
            await _stream_round(producer, stream, -2)
            stream_times = [await _stream_round(producer, stream, 100 + i) for i in range(repeats)]
            keys = json.loads(producer.ask("index 1000"))
            ops = await _index_ops(shm, keys, repeats)
        finally:
            await shm.close()
            await stream.close()
            producer.close()
    return {
        "shm_gbps": TOTAL_BYTES / statistics.median(shm_times) / 1e9,
        "stream_gbps": TOTAL_BYTES / statistics.median(stream_times) / 1e9,
        "index_ops_per_s": ops,
    }


def run_cache_bench(redis_url: str = "", repeats: int = 7) -> dict:
    from epdserve.redis_server import PrivateRedis

    baseline = memcpy_gbps(repeats * 4)
    private = PrivateRedis().start() if not redis_url else None
    try:
        measured = asyncio.run(_measure(redis_url or private.url, repeats))
    finally:
        if private is not None:
            private.stop()
    return {"benchmark": "mmcache throughput", "total_bytes": TOTAL_BYTES, "block_bytes": BLOCK_BYTES,
            "repeats": repeats, "cpus": len(os.sched_getaffinity(0)), "memcpy_gbps": baseline, **measured,
            "shm_vs_memcpy": measured["shm_gbps"] / baseline}


# ---- the producer process ---------------------------------------------------------------------------

async def _produce(redis_url: str, namespace: str) -> None:
    import grpc
    import torch

    from epdserve.config import CacheConfig
    from epdserve.v1 import cache_pb2_grpc
    from mmcache.client import CacheIdentity, MMCache

    config = CacheConfig(redis_url=redis_url, namespace=namespace, capacity_bytes=4 * TOTAL_BYTES)
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    cache = await MMCache.open(config, CacheIdentity(f"bench-producer-{uuid.uuid4().hex[:6]}", f"127.0.0.1:{port}"))
    cache_pb2_grpc.add_CacheControlServicer_to_server(cache.servicer(), server)
    await server.start()
    blocks = [torch.randint(0, 255, (BLOCK_BYTES,), dtype=torch.uint8) for _ in range(TOTAL_BYTES // BLOCK_BYTES)]
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line in ("", "quit"):
                print("bye", flush=True)
                return
            reply = await _command(cache, blocks, line)
            print(reply, flush=True)
    finally:
        await cache.close()
        await server.stop(None)


async def _command(cache, blocks, line: str) -> str:
    import torch

    verb, _, arg = line.partition(" ")
    if verb == "ping":
        return "ready"
    if verb == "put":  # replace the previous round's blocks with fresh ones
        for key in [k for k in cache.store.keys() if k.startswith("kv:")]:
            cache.store.delete(key)
        keys = [f"kv:bench{arg}:{i}" for i in range(len(blocks))]
        await cache.put_many(list(zip(keys, blocks)), ttl_s=300)
        return json.dumps(keys)
    if verb == "index":
        keys = [f"img:bench{i}" for i in range(int(arg))]
        await cache.put_many([(k, torch.zeros(1)) for k in keys], ttl_s=300)
        return json.dumps(keys)
    return "unknown"


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "producer":
        asyncio.run(_produce(sys.argv[2], sys.argv[3]))
    else:
        print(json.dumps(run_cache_bench()))
