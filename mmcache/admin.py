"""Operator views of a cache deployment (`epdserve cache stats|flush|inspect`). These scan Redis,
so they are for people, never for the request path."""

from __future__ import annotations

import json

import grpc

from epdserve.security import NO_CREDENTIALS, Credentials
from epdserve.transport.channels import aio_channel
from epdserve.v1 import cache_pb2, cache_pb2_grpc
from mmcache.index import IndexEntry, schema

SCAN_BATCH = 1000


async def stats(redis, namespace: str, credentials: Credentials = NO_CREDENTIALS) -> dict:
    """Index entries by kind, and per owner: liveness plus what it reports holding (asked over
    CacheControl.Stats with `credentials`)."""
    prefix = schema(namespace)
    kinds: dict[str, int] = {}
    async for key in redis.scan_iter(match=f"{prefix}:e:*", count=SCAN_BATCH):
        kind = _text(key)[len(prefix) + 3:].split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    owners = []
    for owner_id, raw in (await redis.hgetall(f"{prefix}:owners")).items():
        info = json.loads(raw)
        alive = bool(await redis.exists(f"{prefix}:alive:{_text(owner_id)}"))
        owners.append({"owner": _text(owner_id), "host": info.get("host_id", ""), "alive": alive,
                       **(await _owner_stats(info.get("control_address", ""), credentials) if alive else {})})
    return {"namespace": namespace, "index_entries": kinds, "owners": sorted(owners, key=lambda o: o["owner"])}


async def _owner_stats(address: str, credentials: Credentials) -> dict:
    if not address:
        return {}
    channel = aio_channel(address, credentials=credentials)
    try:
        reply = await cache_pb2_grpc.CacheControlStub(channel).Stats(cache_pb2.StatsRequest(), timeout=3)
    except grpc.RpcError as exc:
        return {"error": exc.code().name}
    finally:
        await channel.close()
    return {"entries": dict(reply.entries_by_kind), "used_bytes": dict(reply.used_bytes),
            "capacity_bytes": dict(reply.capacity_bytes), "leases": reply.leases,
            "index_available": reply.index_available, "counters": dict(reply.counters)}


async def flush(redis, namespace: str) -> int:
    """Drop every index entry and readiness stream of the namespace (owners free the bytes by TTL)."""
    prefix, removed = schema(namespace), 0
    for pattern in (f"{prefix}:e:*", f"{prefix}:ready:*"):
        batch = []
        async for key in redis.scan_iter(match=pattern, count=SCAN_BATCH):
            batch.append(key)
            if len(batch) >= SCAN_BATCH:
                removed += await redis.delete(*batch)
                batch = []
        if batch:
            removed += await redis.delete(*batch)
    return removed


async def inspect(redis, namespace: str, key: str) -> dict | None:
    prefix = schema(namespace)
    raw = await redis.get(f"{prefix}:e:{key}")
    if raw is None:
        return None
    entry = IndexEntry.from_json(key, raw)
    ttl_ms = await redis.pttl(f"{prefix}:e:{key}")
    alive = bool(await redis.exists(f"{prefix}:alive:{entry.owner}"))
    return {"key": key, "owner": entry.owner, "owner_alive": alive, "host": entry.host, "tier": entry.tier,
            "dtype": entry.dtype, "shape": list(entry.shape), "nbytes": entry.nbytes, "checksum": entry.checksum,
            "ttl_s": ttl_ms / 1000.0 if ttl_ms > 0 else None}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
