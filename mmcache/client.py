"""MMCache: the facade services use to publish, find, read and release tensors.

Ownership and release protocol (what always holds):
* an entry's bytes live only in its owner's SharedMemoryStore; the Redis index holds its header
  under a TTL no longer than the owner's own expiry, so an index hit names bytes that existed
  when it was written;
* a consumer trusts nothing: the header must match the reference it was handed (dtype, shape,
  nbytes, checksum) and the bytes must match the checksum, or the read is a miss;
* `release` is the consumer saying "done": the index key goes first (no one else can find it),
  then the owner frees the bytes (directly when the owner is this process, else by its Release
  RPC); an owner that never hears frees the bytes at TTL; an owner that stops deletes the index
  keys of everything it still holds. A restarted owner has a new owner id, so nothing points into
  a dead process for longer than the TTL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import socket
import threading
import time
from collections.abc import Sequence

import grpc

from epdserve.config import CacheConfig
from epdserve.errors import UnavailableError
from epdserve.transport.channels import aio_channel
from epdserve.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from mmcache.codec import (
    CorruptEntryError,
    checksum,
    dtype_name,
    name_of_proto_dtype,
    proto_dtype,
    tensor_bytes,
    tensor_from_buffer,
    verify,
)
from mmcache.index import IndexEntry, RedisIndex
from mmcache.store import SharedMemoryStore, default_shm_dir, map_file
from mmcache.transfer import CacheTransferServicer, fetch_remote

log = logging.getLogger(__name__)
SWEEP_INTERVAL_S = 1.0
RELEASE_TIMEOUT_S = 2.0


@dataclasses.dataclass(frozen=True)
class OwnerInfo:
    owner_id: str   # unique per process start (the epoch)
    host_id: str
    address: str    # this process's gRPC address serving CacheTransfer ("" if none)


def local_host_id() -> str:
    try:
        boot_id = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    return f"{socket.gethostname()}/{boot_id}"


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    bytes_put: int = 0
    bytes_read_local: int = 0
    bytes_read_remote: int = 0


class MMCache:
    def __init__(self, config: CacheConfig, owner: OwnerInfo, redis, store: SharedMemoryStore) -> None:
        self.config, self.owner, self.redis, self.store = config, owner, redis, store
        self.index = RedisIndex(redis, config.namespace)
        self.stats = CacheStats()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._sweeper: asyncio.Task | None = None
        self._closed = False

    @classmethod
    async def open(cls, config: CacheConfig, owner: OwnerInfo) -> "MMCache":
        """Connect to Redis (UnavailableError if unreachable), create the store, start the sweeper."""
        import redis.asyncio as aioredis

        client = aioredis.from_url(config.redis_url, socket_timeout=config.redis_timeout_s,
                                   socket_connect_timeout=config.redis_timeout_s)
        try:
            await client.ping()
        except (OSError, aioredis.RedisError) as exc:
            await client.aclose()
            raise UnavailableError(f"cannot reach Redis at {_redact(config.redis_url)}: {exc}") from None
        directory = pathlib.Path(config.shm_dir) if config.shm_dir else default_shm_dir(owner.owner_id)
        cache = cls(config, owner, client, SharedMemoryStore(directory, config.capacity_bytes))
        cache._sweeper = asyncio.create_task(cache._sweep())
        return cache

    def servicer(self) -> CacheTransferServicer:
        return CacheTransferServicer(self, self.config.fetch_chunk_bytes)

    # ---- producer side -------------------------------------------------------------------------

    async def put_many(self, items: Sequence[tuple[str, "object"]], *, ttl_s: float) -> list[common_pb2.TensorRef]:
        """Publish tensors under keys: bytes into this process's store, headers into the index in one
        pipeline. Keys evicted to make room leave the index too. Returns the references."""
        entries, refs, evicted = [], [], []
        for key, tensor in items:
            data = tensor_bytes(tensor)
            meta = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "checksum": checksum(data)}
            written = self.store.write(key, data, ttl_s, meta)
            evicted.extend(written.evicted)
            entries.append(self._entry(key, written.entry.path, meta, len(data)))
            refs.append(common_pb2.TensorRef(key=key, dtype=proto_dtype(meta["dtype"]), shape=meta["shape"],
                                             nbytes=len(data), checksum=meta["checksum"]))
            self.stats.bytes_put += len(data)
        await self.index.delete_many([k for k in evicted if k not in {key for key, _ in items}])
        await self.index.put_many(entries, ttl_s)
        return refs

    async def put(self, key: str, tensor, *, ttl_s: float) -> common_pb2.TensorRef:
        return (await self.put_many([(key, tensor)], ttl_s=ttl_s))[0]

    def _entry(self, key: str, path: pathlib.Path, meta: dict, nbytes: int) -> IndexEntry:
        return IndexEntry(key=key, owner=self.owner.owner_id, host=self.owner.host_id, address=self.owner.address,
                          location=str(path), dtype=meta["dtype"], shape=tuple(meta["shape"]), nbytes=nbytes,
                          checksum=meta["checksum"], created_at=time.time())

    async def lookup_many(self, keys: Sequence[str], *, ttl_s: float | None = None
                          ) -> list[common_pb2.TensorRef | None]:
        """References for keys the index holds (refreshing their TTL when ttl_s is given). An entry this
        process owns but no longer holds is stale: it is dropped and reported as a miss."""
        found, stale = [], []
        for key, entry in zip(keys, await self.index.get_many(keys)):
            if entry is not None and entry.owner == self.owner.owner_id and not self.store.contains(key):
                stale.append(key)
                entry = None
            found.append(None if entry is None else _ref(entry))
        await self.index.delete_many(stale)
        if ttl_s is not None:
            live = [k for k, ref in zip(keys, found) if ref is not None]
            await self.index.touch_many(live, ttl_s)
            for key in live:
                self.store.touch(key, ttl_s)
        return found

    # ---- consumer side -------------------------------------------------------------------------

    async def get_many(self, refs: Sequence[common_pb2.TensorRef]) -> list:
        """Tensors for the references, in order; a missing, mismatched or corrupt entry is None.
        Same-host entries are mapped in place (the returned CPU tensor keeps the mapping alive);
        others are streamed from their owner."""
        entries = await self.index.get_many([ref.key for ref in refs])
        reads = [self._read(ref, entry) for ref, entry in zip(refs, entries)]
        return list(await asyncio.gather(*reads))

    async def _read(self, ref: common_pb2.TensorRef, entry: IndexEntry | None):
        if entry is None:
            self.stats.misses += 1
            return None
        try:
            _check_header(ref, entry)
            data = await self._bytes(entry)
            if data is None:
                self.stats.misses += 1
                return None
            verify(data, entry.checksum)
            tensor = tensor_from_buffer(data, entry.dtype, entry.shape)
        except (CorruptEntryError, grpc.RpcError, OSError) as exc:
            self.stats.corrupt += isinstance(exc, CorruptEntryError)
            self.stats.misses += 1
            log.warning("cache entry %s unusable, treated as a miss: %s", ref.key, exc)
            return None
        self.stats.hits += 1
        return tensor

    async def _bytes(self, entry: IndexEntry):
        if self.config.prefer_shared_memory and entry.host == self.owner.host_id:
            data = map_file(pathlib.Path(entry.location))
            if data is not None:
                self.stats.bytes_read_local += len(data)
                return data
        if not entry.address:
            return None
        try:
            header, data = await fetch_remote(self._stub(entry.address), entry.key,
                                              timeout_s=max(self.config.redis_timeout_s, 30.0))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        if name_of_proto_dtype(header.dtype) != entry.dtype or tuple(header.shape) != entry.shape:
            raise CorruptEntryError("owner's header differs from the index")
        self.stats.bytes_read_remote += len(data)
        log.debug("streamed %s (%d bytes) from its owner", entry.key, len(data))
        return data

    def _stub(self, address: str) -> cache_pb2_grpc.CacheTransferStub:
        if address not in self._channels:
            self._channels[address] = aio_channel(address)
        return cache_pb2_grpc.CacheTransferStub(self._channels[address])

    async def release(self, refs_or_keys: Sequence) -> None:
        """The consumer is done with these entries: drop them from the index, then have their owners
        free the bytes (best effort; the TTL is the backstop)."""
        keys = [r if isinstance(r, str) else r.key for r in refs_or_keys]
        if not keys:
            return
        entries = await self.index.get_many(keys)
        await self.index.delete_many(keys)
        by_owner: dict[str, list[str]] = {}
        for key, entry in zip(keys, entries):
            if self.store.get(key) is not None:
                self.store.delete(key)
            elif entry is not None and entry.address:
                by_owner.setdefault(entry.address, []).append(key)
        await asyncio.gather(*(self._release_remote(address, owned) for address, owned in by_owner.items()))

    async def _release_remote(self, address: str, keys: list[str]) -> None:
        try:
            await self._stub(address).Release(cache_pb2.ReleaseRequest(keys=keys), timeout=RELEASE_TIMEOUT_S)
        except grpc.RpcError as exc:
            log.warning("release of %d entries at their owner failed (%s); they expire by TTL", len(keys), exc.code())

    async def free_owned(self, keys: Sequence[str]) -> int:
        """Owner side of Release: free the bytes of keys this process holds, drop their index keys."""
        owned = [k for k in keys if self.store.get(k) is not None]
        for key in owned:
            self.store.delete(key)
        await self.index.delete_many(owned)
        return len(owned)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.store.expired()

    async def close(self) -> None:
        """Delete the index keys of everything still held, remove the store, close connections."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        try:
            await self.index.delete_many(self.store.keys())
        except Exception as exc:  # Redis may already be gone at shutdown; the TTL cleans up
            log.warning("could not drop index keys at close: %s", exc)
        self.store.close()
        await asyncio.gather(*(c.close() for c in self._channels.values()))
        await self.redis.aclose()


def _ref(entry: IndexEntry) -> common_pb2.TensorRef:
    return common_pb2.TensorRef(key=entry.key, dtype=proto_dtype(entry.dtype), shape=entry.shape,
                                nbytes=entry.nbytes, checksum=entry.checksum)


def _check_header(ref: common_pb2.TensorRef, entry: IndexEntry) -> None:
    if (name_of_proto_dtype(ref.dtype) != entry.dtype or tuple(ref.shape) != entry.shape
            or ref.nbytes != entry.nbytes or ref.checksum != entry.checksum):
        raise CorruptEntryError("index header does not match the reference")


def _redact(url: str) -> str:
    """redis://user:secret@host -> redis://user:***@host"""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


class SyncMMCache:
    """Blocking facade over MMCache (tests, CLI): runs it on a private loop in a daemon thread."""

    def __init__(self, config: CacheConfig, owner: OwnerInfo) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="mmcache-sync")
        self._thread.start()
        self.cache: MMCache = self._call(MMCache.open(config, owner))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def put_many(self, items, *, ttl_s: float):
        return self._call(self.cache.put_many(items, ttl_s=ttl_s))

    def put(self, key, tensor, *, ttl_s: float):
        return self._call(self.cache.put(key, tensor, ttl_s=ttl_s))

    def lookup_many(self, keys, *, ttl_s: float | None = None):
        return self._call(self.cache.lookup_many(keys, ttl_s=ttl_s))

    def get_many(self, refs):
        return self._call(self.cache.get_many(refs))

    def release(self, refs_or_keys) -> None:
        self._call(self.cache.release(refs_or_keys))

    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self.cache.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> "SyncMMCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
