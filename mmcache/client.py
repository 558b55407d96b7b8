"""MMCache: the facade a stage uses to publish, find, read, lease and release tensors.

Ownership and lease protocol (what always holds):
* an entry's bytes live only in its owner's TieredStore; refs carry where (host, tier, path,
  offset, data address), so a hand-off needs no index round trip and survives an index outage;
  the Redis index is for discovery by content key, and only returns entries of live owners;
* every hand-off holds a lease taken by the producer on the consumer's behalf (put with lease_s,
  or lookup with lease_s); leased bytes are never moved or freed, so the consumer's zero-copy
  view stays valid until it calls `release`; a lease that is never released expires, and an
  ephemeral entry (KV for one decode) is freed with its last lease;
* a consumer trusts nothing it reads: the bytes must match the ref's size and checksum, or the
  read is a miss (counted), never a crash;
* an owner heartbeats, from its event loop and from a thread; when it stops (cleanly or not) its
  entries leave the index, by its own `close` or by any other owner's janitor, and its files on
  this host are removed; while only its event loop is blocked, its entries are not offered but kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import pathlib
import re
import time
from collections.abc import Sequence

import grpc
import torch

from epdserve import tracing
from epdserve.config import CacheConfig
from epdserve.errors import UnavailableError
from epdserve.security import NO_CREDENTIALS, Credentials
from epdserve.threadpool import DealtPool, run_all
from epdserve.transport.channels import aio_channel
from epdserve.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from mmcache.codec import (
    CorruptEntryError,
    check_layout,
    checksum,
    dtype_name,
    name_of_proto_dtype,
    proto_dtype,
    tensor_bytes,
    tensor_from_buffer,
    verify,
)
from mmcache.guard import CacheUnavailableError, RedisGuard
from mmcache.index import IndexEntry, RedisIndex
from mmcache.metrics import CacheMetrics
from mmcache.owners import (
    OwnerInfo,
    OwnerRegistry,
    ProcessBeat,
    disk_dir,
    local_host_id,
    pool_file,
    remove_owner_files,
)
from mmcache.pool import PoolMappings, SharedMemoryPool, region_bytes
from mmcache.readiness import ReadinessStream
from mmcache.store import CapacityError, Entry, PutResult, Reservation, TieredStore, default_store_dir
from mmcache.tiers import DeviceTier, DiskTier, HostTier
from mmcache.transfer import CacheControlServicer, DataClient, DataServer

log = logging.getLogger(__name__)
CONTROL_TIMEOUT_S = 2.0
PARALLEL_MIN_BYTES = 256 << 10  # entries at least this large are copied / checksummed in worker threads
SPLIT_MIN_BYTES = 8 << 20  # ... and entries this large are spread over all the worker threads
CONTENT_KEY_KINDS = ("img:", "kvb:")  # keys that are content hashes (equal key = equal bytes)
JANITOR_EVERY = 5  # heartbeats
SPACE_POLL_S = 0.25  # a waiting reservation looks again at least this often (frees it is not told of)


@dataclasses.dataclass(frozen=True)
class ReservedTensor:
    """A host-pool region held for one entry before its bytes exist (`MMCache.reserve_tensors`),
    and `tensor`, a CPU view of it to write them into (page-locked when the pool is)."""

    reservation: Reservation
    tensor: torch.Tensor  # of the entry's shape and dtype


@dataclasses.dataclass(frozen=True)
class CacheIdentity:
    owner_id: str               # unique per process start
    control_address: str        # this process's gRPC address (CacheControl); "" if it serves none
    bind_host: str = "127.0.0.1"  # where the data channel listens
    advertise_host: str = ""    # host name others use to reach the data channel ("" = bind_host)


class MMCache:
    def __init__(self, config: CacheConfig, owner: OwnerInfo, redis, store: TieredStore,
                 credentials: Credentials = NO_CREDENTIALS) -> None:
        self.config, self.owner, self.redis, self.store = config, owner, redis, store
        self.credentials = credentials  # the data channel's and every CacheControl call's
        self.metrics = CacheMetrics()
        self.guard = RedisGuard(redis, timeout_s=config.redis_timeout_s, on_change=self.metrics.set_available)
        self.index = RedisIndex(redis, config.namespace, self.guard)
        self.registry = OwnerRegistry(self.index, self.guard, owner, interval_s=config.heartbeat_interval_s)
        self.ready = ReadinessStream(self.index, self.guard)
        self.data_client = DataClient(timeout_s=max(config.redis_timeout_s, 30.0), credentials=credentials)
        self.mappings = PoolMappings()
        self._other_hosts: set[str] = set()
        self.data_server: DataServer | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._workers = DealtPool(_worker_count(), "mmcache")
        self._tasks: list[asyncio.Task] = []
        self._process_beat: ProcessBeat | None = None
        self._closed = False
        self._reserved: dict[int, Reservation] = {}  # offset -> region reserved, not yet committed or abandoned
        self._space_freed = asyncio.Event()
        self._reserving = asyncio.Lock()  # waiting reservations are served in arrival order
        if "host" in store.tiers:
            self.metrics.watch_pool(store.tiers["host"].pool)

    @classmethod
    async def open(cls, config: CacheConfig, identity: CacheIdentity,
                   credentials: Credentials = NO_CREDENTIALS, *, page_lock_pool: bool = False) -> "MMCache":
        """Create the store, start the data channel, register, and start the background loop.
        Redis being down is not fatal: the cache starts degraded and reconnects later. With
        `credentials` the data channel needs the token / TLS, and calls to other owners send them.
        `page_lock_pool`: register the host pool with CUDA (`page_lock_pool`) before the first
        heartbeat, since it holds the event loop for seconds (10.7 s for 24 GiB on an H100 host)."""
        import redis.asyncio as aioredis

        store_dir = pathlib.Path(config.shm_dir) if config.shm_dir else default_store_dir(identity.owner_id)
        store = _build_store(config, store_dir, identity.owner_id)
        client = aioredis.from_url(config.redis_url, socket_timeout=config.redis_timeout_s,
                                   socket_connect_timeout=config.redis_timeout_s)
        cache = cls(config, OwnerInfo(identity.owner_id, local_host_id(), identity.control_address,
                                      store_dir=str(store_dir)), client, store, credentials)
        if page_lock_pool:
            cache.page_lock_pool()
        await cache._start(identity)
        return cache

    async def _start(self, identity: CacheIdentity) -> None:
        self.data_server = DataServer(self._acquire_for_send, self.config.fetch_chunk_bytes, self.credentials)
        port = await self.data_server.start(identity.bind_host)
        host = identity.advertise_host or identity.bind_host
        self.owner = dataclasses.replace(self.owner, data_address=f"{host}:{port}")
        self.registry.owner = self.owner
        await self._beat(first=True)
        self._process_beat = ProcessBeat(self.config.redis_url, self.index.live_key(self.owner.owner_id),
                                         interval_s=self.config.heartbeat_interval_s, ttl_s=self.registry.ttl_s,
                                         timeout_s=self.config.redis_timeout_s)
        self._process_beat.start()
        self._tasks.append(asyncio.create_task(self._maintain()))

    def servicer(self) -> CacheControlServicer:
        return CacheControlServicer(self)

    @property
    def available(self) -> bool:
        """Whether the Redis index answered last time it was asked."""
        return self.guard.available

    # ---- producer side ---------------------------------------------------------------------------

    async def put_many(self, items: Sequence[tuple[str, object]], *, ttl_s: float, lease_s: float | None = None,
                       ephemeral: bool = False) -> list[common_pb2.TensorRef]:
        """Hold tensors under keys and index them (one pipeline). With lease_s, each ref carries a
        lease for its consumer; an ephemeral entry is freed when that lease ends. The store takes
        ownership of the tensors. Index trouble is logged, never raised: the refs still work.
        Traced as one `mmcache.put` span (entries, bytes, tier)."""
        with tracing.span("mmcache.put") as span:
            refs = await self._put_many(items, ttl_s=ttl_s, lease_s=lease_s, ephemeral=ephemeral)
            if span.is_recording():
                span.set_attributes(_span_attributes(refs))
            return refs

    async def _put_many(self, items: Sequence[tuple[str, object]], *, ttl_s: float, lease_s: float | None,
                        ephemeral: bool) -> list[common_pb2.TensorRef]:
        options = dict(ttl_s=ttl_s, ephemeral=ephemeral, lease_s=lease_s)
        puts: list = [None] * len(items)
        fills = []  # (position, key, meta, reservation, source bytes)
        before = {key: self.store.get(key) for key, _ in items}  # (an entry found damaged below is replaced)
        intact = await self._intact_held([key for key, _ in items if key.startswith(CONTENT_KEY_KINDS)])
        for i, (key, tensor) in enumerate(items):
            if key in intact and self.store.get(key) is intact[key]:  # still the entry that was verified
                puts[i] = self._keep_held(key, options)  # same content key: the bytes are already here
                continue
            meta, host = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}, tensor_bytes(tensor)
            on_device = _on_device(tensor, self.store)
            reservation = None if on_device or len(host) < PARALLEL_MIN_BYTES else self.store.reserve_host(len(host))
            if reservation is None:
                meta["checksum"] = checksum(host)
                if self._held_by_a_concurrent_put(key, meta["checksum"], before):
                    puts[i] = self._keep_held(key, options)
                else:
                    puts[i] = self.store.put(key, tensor if on_device else host, meta, **options)
            else:
                fills.append((i, key, meta, reservation, host))
        digests = await self._fill(fills)
        for (i, key, meta, reservation, _), digest in zip(fills, digests):
            if self._held_by_a_concurrent_put(key, digest, before):
                self.store.abandon(reservation)
                puts[i] = self._keep_held(key, options)
            else:
                puts[i] = self.store.commit(key, reservation, {**meta, "checksum": digest}, **options)
        refs = [self._ref(key, put.lease_id) for (key, _), put in zip(items, puts)]
        self.metrics.bytes_put.inc(sum(put.entry.nbytes for put in puts))
        await self._sync_index(new=refs, ttl_s=ttl_s)
        return refs

    # ---- reserved entries: memory first, bytes later ----------------------------------------------

    @property
    def page_locked(self) -> bool:
        """Whether the host pool is registered with CUDA (`page_lock_pool`)."""
        return "host" in self.store.tiers and self.store.tiers["host"].pool.page_locked

    def page_lock_pool(self) -> bool:
        """Register the host pool with CUDA so a GPU copies straight into reserved regions; False
        (logged) when it cannot be (no GPU, memlock limit), and the pool works as before."""
        try:
            self.store.tiers["host"].pool.page_lock()
            return True
        except Exception as exc:  # noqa: BLE001 - any refusal leaves a working, unlocked pool
            log.warning("cache pool not page-locked, so GPU copies go through a pinned buffer (--no-kv-zero-copy "
                        "skips trying): %s", exc)
            return False

    async def reserve_tensors(self, layouts: Sequence[tuple[tuple[int, ...], torch.dtype]], *, timeout_s: float,
                              held_bytes: int = 0, what: str = "entries", wait_flag: str = "") -> list[ReservedTensor]:
        """Host-pool regions for tensors of these (shape, dtype), all or none. While the pool cannot
        hold them all (after evicting what is not leased: nothing is evicted for an attempt that
        would still fail), waits for room (earlier hand-offs being released), in arrival order, up
        to `timeout_s` in all. Each region must end in `commit_reserved` or `abandon`. Raises
        CapacityError (RESOURCE_EXHAUSTED) at once when they cannot fit even in an empty pool next
        to the `held_bytes` the caller itself holds there, or when there was no room in time
        (`what` names them and `wait_flag` the caller's setting of the time limit, in messages)."""
        sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in layouts]
        pool, need = self.store.tiers["host"].pool, sum(region_bytes(n) for n in sizes)
        if need + held_bytes > pool.capacity_bytes:
            self.metrics.reserve_refused.inc()
            held = f" next to the {held_bytes} bytes it holds there" if held_bytes else ""
            raise CapacityError(f"{what} ({need} bytes){held} cannot fit the cache pool ({pool.capacity_bytes} "
                                "bytes): raise --capacity-bytes")
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s), self._reserving:
                while (reserved := self._reserve_all(sizes)) is None:
                    self._space_freed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(SPACE_POLL_S):
                            await self._space_freed.wait()
        except TimeoutError:
            self.metrics.reserve_refused.inc()
            limit = f" ({wait_flag})" if wait_flag else ""
            raise CapacityError(f"{what} ({need} bytes) found no room in the cache pool within {timeout_s:g} s{limit}"
                                f": {pool.free_bytes} of {pool.capacity_bytes} bytes free, the rest held for "
                                "readers; retry later or raise --capacity-bytes", retry_after_s=1.0) from None
        self.metrics.reserve_wait.observe(time.monotonic() - started)
        return [ReservedTensor(r, _tensor_view(r.view, dtype, shape)) for r, (shape, dtype) in zip(reserved, layouts)]

    def room_bytes(self, enough: int | None = None) -> int:
        """Bytes a reservation could take now: the pool's free bytes and what eviction would free.
        With `enough`, exact below it and some figure >= `enough` otherwise (what is evictable is
        counted only as far as needed)."""
        free = self.store.tiers["host"].pool.free_bytes
        if enough is not None and free >= enough:
            return free
        return free + self.store.evictable_bytes("host", None if enough is None else enough - free)

    def _reserve_all(self, sizes: list[int]) -> list[Reservation] | None:
        need = sum(region_bytes(n) for n in sizes)
        if self.room_bytes(enough=need) < need:
            return None  # cannot succeed now: evict nothing
        taken = []
        for nbytes in sizes:
            reservation = self.store.reserve_host(nbytes)
            if reservation is None:
                for done in taken:
                    self.store.abandon(done)
                return None
            taken.append(reservation)
        self._reserved.update((r.offset, r) for r in taken)
        return taken

    def _untrack(self, reservation: Reservation) -> bool:
        """Stop tracking a reserved region; False when it is not outstanding (already committed or
        given back, and its offset perhaps reserved again since by someone else)."""
        if self._reserved.get(reservation.offset) is not reservation:
            return False
        del self._reserved[reservation.offset]
        return True

    async def commit_reserved(self, items: Sequence[tuple[str, ReservedTensor, object]], *, ttl_s: float,
                              lease_s: float | None = None, ephemeral: bool = False) -> list[common_pb2.TensorRef]:
        """Make reserved regions entries under keys: each region's bytes are its tensor's as
        written, or copied from the item's source tensor when it is not None; checksummed in worker
        threads, then indexed like `put_many`'s. On failure or cancellation the regions are
        abandoned."""
        fills = []
        for i, (key, reserved, source) in enumerate(items):
            meta = {"dtype": dtype_name(reserved.tensor.dtype), "shape": list(reserved.tensor.shape)}
            fills.append((i, key, meta, reserved.reservation, None if source is None else tensor_bytes(source)))
        digests = await self._fill(fills, on_error=lambda: self.abandon([item[1] for item in items]))
        puts = []
        for (_, key, meta, reservation, _), digest in zip(fills, digests):
            if not self._untrack(reservation):
                raise ValueError(f"{key}: its region is not reserved (given back already)")
            puts.append(self.store.commit(key, reservation, {**meta, "checksum": digest}, ttl_s=ttl_s,
                                          lease_s=lease_s, ephemeral=ephemeral))
        refs = [self._ref(put.entry.key, put.lease_id) for put in puts]
        self.metrics.bytes_put.inc(sum(put.entry.nbytes for put in puts))
        await self._sync_index(new=refs, ttl_s=ttl_s)
        return refs

    def abandon(self, reserved: Sequence[ReservedTensor]) -> None:
        """Give reserved regions back (those already committed or abandoned are skipped). Nothing
        may still be writing into them."""
        for item in reserved:
            if self._untrack(item.reservation):
                self.store.abandon(item.reservation)
        self._space_freed.set()

    async def _intact_held(self, keys: Sequence[str]) -> dict[str, Entry]:
        """The held entries of `keys` whose bytes still match their checksum (damaged bytes are
        replaced, not kept), checksummed off the event loop when large. Returns key -> entry."""
        held = {key: self.store.get(key) for key in keys}
        held = {key: entry for key, entry in held.items() if entry is not None}
        if not held:
            return {}
        data = {key: tensor_bytes(e.handle) if e.tier == "device" else self.store.host_bytes(key)
                for key, e in held.items()}
        good = await self._verify([(data[k], held[k].meta["checksum"]) for k in held])
        return {key: entry for (key, entry), ok in zip(held.items(), good) if ok}

    def _held_by_a_concurrent_put(self, key: str, digest: str, before: dict) -> bool:
        """Whether a content-keyed entry with these very bytes appeared while this put was computing
        (two requests missed the same image and both encoded it; `before`: what was held when the put
        began). That entry's refs may be out under leases: it is kept, since replacing it would free
        their region under its readers."""
        held = self.store.get(key) if key.startswith(CONTENT_KEY_KINDS) else None
        return held is not None and held is not before.get(key) and held.meta.get("checksum") == digest

    def _keep_held(self, key: str, options: dict):
        """A content-keyed put of a key already held: keep the held bytes (equal keys mean equal
        content, and replacing them would pull the bytes from under another reader's lease)."""
        self.store.touch(key, options["ttl_s"])
        lease_id = self.store.lease(key, options["lease_s"]) if options["lease_s"] else ""
        return PutResult(self.store.get(key), lease_id or "")

    async def _fill(self, fills: list[tuple], on_error=None) -> list[str]:
        """Copy each fill's source bytes into its reserved region (a fill without source: its
        bytes are there already) and return their checksums, in worker threads. When fewer
        entries of SPLIT_MIN_BYTES or more than threads come together (prefill publishes one KV
        layer at a time: 54 MB at 7B), each is spread over every thread: one checksums the source
        while the others copy a slice each (the copy and the checksum of one 54 MB layer took
        8 + 3.5 ms in a row, one thread); more of them go one per thread. `on_error` gives the
        regions back on failure (default: straight to the store)."""
        jobs, digest_at = [], []
        copiers = self._workers.threads - 1
        large = sum(1 for *_, source in fills if source is not None and len(source) >= SPLIT_MIN_BYTES)
        split = copiers >= 1 and large < self._workers.threads  # more large entries: one per thread is as good
        for _, _, _, reservation, source in fills:
            digest_at.append(len(jobs))
            if source is None:
                jobs.append((checksum, reservation.view))
                continue
            if not split or len(source) < SPLIT_MIN_BYTES:
                jobs.append((_copy_and_checksum, reservation.view, source))
                continue
            jobs.append((checksum, source))
            jobs.extend((_copy, reservation.view[a:b], source[a:b]) for a, b in _slices(len(source), copiers))
        abandon_all = on_error or (lambda: [self.store.abandon(f[3]) for f in fills])
        results = await self._parallel(_call, jobs, on_error=abandon_all)
        return [results[i] for i in digest_at]

    async def _parallel(self, fn, jobs: list[tuple], *, on_error=None, inline: bool = False) -> list:
        """fn(*job) for each job, one chunk of jobs per worker thread (copies and checksums release
        the GIL, so chunks run in parallel); `inline` runs them here instead (small work, where a
        thread hop costs more than it saves). Results in job order."""
        if inline:
            return run_all(fn, jobs)
        try:
            return await self._workers.map(fn, jobs)
        except BaseException:
            if on_error is not None:
                on_error()
            raise

    async def _verify(self, pairs: list[tuple]) -> list[bool]:
        """Whether each (bytes, expected checksum) pair matches; in worker threads unless the bytes
        are few in all."""
        small = sum(len(data) for data, _ in pairs) < PARALLEL_MIN_BYTES
        return await self._parallel(_verified_sync, pairs, inline=small)

    async def put(self, key: str, tensor, *, ttl_s: float, lease_s: float | None = None,
                  ephemeral: bool = False) -> common_pb2.TensorRef:
        return (await self.put_many([(key, tensor)], ttl_s=ttl_s, lease_s=lease_s, ephemeral=ephemeral))[0]

    def _ref(self, key: str, lease_id: str = "") -> common_pb2.TensorRef:
        entry, where = self.store.get(key), self.store.location(key)
        return common_pb2.TensorRef(
            key=key, dtype=proto_dtype(entry.meta["dtype"]), shape=entry.meta["shape"], nbytes=entry.nbytes,
            checksum=entry.meta["checksum"], owner=self.owner.owner_id, host=self.owner.host_id,
            control_address=self.owner.control_address, data_address=self.owner.data_address,
            tier=where.tier, path=where.path, offset=where.offset, lease_id=lease_id)

    def _index_entry(self, key: str, ref: common_pb2.TensorRef | None = None) -> IndexEntry:
        ref = ref or self._ref(key)
        return IndexEntry(key=key, owner=ref.owner, host=ref.host, control_address=ref.control_address,
                          data_address=ref.data_address, tier=ref.tier, path=ref.path, offset=ref.offset,
                          dtype=name_of_proto_dtype(ref.dtype), shape=tuple(ref.shape), nbytes=ref.nbytes,
                          checksum=ref.checksum, created_at=time.time())

    async def _sync_index(self, *, new: Sequence[common_pb2.TensorRef] = (), ttl_s: float = 0.0) -> None:
        """Tell the index what changed in the store: new entries (their refs), moved ones, dropped ones."""
        changes = self.store.drain_changes()
        fresh = [r for r in new if self.store.get(r.key) is not None]
        keys = {r.key for r in fresh}
        moved = [k for k in changes.moved if k not in keys]
        try:
            await self.index.put_many([self._index_entry(r.key, r) for r in fresh], ttl_s, drop=changes.dropped)
            await self.index.update_many([self._index_entry(k) for k in moved])
            if changes.dropped:
                await self.index.delete_many(changes.dropped, owner=self.owner.owner_id)
        except CacheUnavailableError:
            log.debug("index unavailable: %d new, %d moved, %d dropped entries not indexed",
                      len(fresh), len(moved), len(changes.dropped))

    # ---- discovery ---------------------------------------------------------------------------------

    async def lookup_many(self, keys: Sequence[str], *, ttl_s: float | None = None,
                          lease_s: float | None = None) -> list[common_pb2.TensorRef | None]:
        """Refs for the keys the index knows (live owners only), refreshing TTLs when ttl_s is given.
        With lease_s each hit is leased for the caller's consumer (a hit whose owner no longer has
        the bytes becomes a miss). Index unavailable: every key misses."""
        try:
            entries = await self.index.get_many(keys, ttl_s=ttl_s)
        except CacheUnavailableError:
            self.metrics.misses.inc(len(keys))
            return [None] * len(keys)
        refs = [_ref_from_index(e) if e is not None else None for e in entries]
        await self._claim(refs, ttl_s, lease_s)
        hits = sum(r is not None for r in refs)
        self.metrics.hits.inc(hits)
        self.metrics.misses.inc(len(keys) - hits)
        return refs

    async def longest_prefix(self, keys: Sequence[str], *, lease_s: float) -> list[common_pb2.TensorRef]:
        """Leased refs of the longest run of keys, from the first, that are all cached."""
        refs = await self.lookup_many(keys, lease_s=lease_s)
        run = next((i for i, r in enumerate(refs) if r is None), len(refs))
        await self.release([r for r in refs[run:] if r is not None])
        return refs[:run]

    async def _claim(self, refs: list, ttl_s: float | None, lease_s: float | None) -> None:
        """Make hits current: own entries are checked (stale ones dropped) and leased locally;
        others are leased through their owner's control service."""
        remote: dict[str, list[int]] = {}
        for i, ref in enumerate(refs):
            if ref is None:
                continue
            if ref.owner == self.owner.owner_id:
                refs[i] = self._claim_local(ref.key, ttl_s, lease_s)
            elif lease_s:
                remote.setdefault(ref.control_address, []).append(i)
        for address, positions in remote.items():
            ids = await self._remote_lease(address, [refs[i].key for i in positions], lease_s)
            for i, lease_id in zip(positions, ids):
                refs[i] = _with_lease(refs[i], lease_id) if lease_id else None
        await self._sync_index()

    def _claim_local(self, key: str, ttl_s: float | None, lease_s: float | None):
        if self.store.get(key) is None:
            return None
        self.store.touch(key, ttl_s)
        lease_id = self.store.lease(key, lease_s) if lease_s else ""
        return self._ref(key, lease_id or "")

    async def _remote_lease(self, address: str, keys: list[str], lease_s: float) -> list[str]:
        if not address:  # the owner serves no control service: its entries cannot be leased
            return [""] * len(keys)
        try:
            stub = cache_pb2_grpc.CacheControlStub(self._channel(address))
            reply = await stub.Lease(cache_pb2.LeaseRequest(keys=keys, lease_s=lease_s), timeout=CONTROL_TIMEOUT_S)
            return list(reply.lease_ids)
        except grpc.RpcError as exc:
            log.warning("lease at %s failed (%s): treated as misses", address, exc.code())
            return [""] * len(keys)

    # ---- consumer side -----------------------------------------------------------------------------

    async def get_many(self, refs: Sequence[common_pb2.TensorRef]) -> list:
        """Tensors for refs, in order; None for an entry that is gone or fails verification.
        Leased same-host entries are zero-copy views valid until `release`; anything else is a copy.
        In-place bytes are verified in parallel; what fails (or is not on this host) comes from the
        owner's data channel (an `mmcache.transfer` span each). Traced as one `mmcache.get` span
        (entries, bytes and tier of the refs, misses)."""
        if not refs:
            return []
        with tracing.span("mmcache.get") as span:
            results = await self._get_many(refs)
            if span.is_recording():
                span.set_attributes({**_span_attributes(refs), "mmcache.misses": results.count(None)})
            return results

    async def _get_many(self, refs: Sequence[common_pb2.TensorRef]) -> list:
        results: list = [None] * len(refs)
        views: dict[int, object] = {}
        unsound = {i for i, ref in enumerate(refs) if not self._sound(ref)}
        for i, ref in enumerate(refs):
            if i in unsound:
                continue
            own = self.store.get(ref.key) if ref.owner == self.owner.owner_id else None
            if own is not None and own.tier == "device" and own.meta["checksum"] == ref.checksum:
                results[i] = own.handle  # owner-local GPU entry: the tensor itself, valid until release
                continue
            data = self._read_in_place(ref)
            if data is not None:
                views[i] = data
        good = await self._verify([(views[i], refs[i].checksum) for i in views])
        remote = [i for i in range(len(refs)) if results[i] is None and i not in views and i not in unsound]
        for (i, data), ok in zip(views.items(), good):
            if ok:
                results[i] = self._tensor(refs[i], data)
            else:  # damaged or stale in place: ask the owner for the current bytes
                self.metrics.corrupt.inc()
                remote.append(i)
        fetched = await asyncio.gather(*(self._read_remote_or_miss(refs[i]) for i in remote))
        for i, tensor in zip(remote, fetched):
            results[i] = tensor
        return results

    def _sound(self, ref: common_pb2.TensorRef) -> bool:
        """Whether a ref's header adds up (`_check_ref`) before anything is mapped, read or allocated
        for it; a ref that does not is a miss, counted as corrupt."""
        try:
            _check_ref(ref)
            return True
        except CorruptEntryError as exc:
            self.metrics.corrupt.inc()
            self.metrics.misses.inc()
            log.warning("cache ref %.80r refused: %s", ref.key, exc)
            return False

    def _tensor(self, ref: common_pb2.TensorRef, data):
        try:
            return tensor_from_buffer(data, name_of_proto_dtype(ref.dtype), tuple(ref.shape))
        except CorruptEntryError as exc:
            self.metrics.corrupt.inc()
            log.warning("cache entry %s unusable: %s", ref.key, exc)
            return None

    async def _read_remote_or_miss(self, ref: common_pb2.TensorRef):
        try:
            data = await self._read_remote(ref)
        except (CorruptEntryError, OSError, asyncio.TimeoutError) as exc:
            self.metrics.corrupt.inc(isinstance(exc, CorruptEntryError))
            log.warning("cache entry %s unusable, treated as a miss: %s", ref.key, exc)
            data = None
        if data is None:
            self.metrics.misses.inc()
            return None
        return self._tensor(ref, data)

    def _read_in_place(self, ref: common_pb2.TensorRef):
        if ref.owner == self.owner.owner_id:
            data = self.store.host_bytes(ref.key)
            return data if data is None or ref.lease_id else bytearray(data)
        if not self.config.prefer_shared_memory:
            return None
        if ref.host != self.owner.host_id:
            if ref.host not in self._other_hosts:
                self._other_hosts.add(ref.host)
                log.info("entries owned on host %r are read over their owners' data channels (this is %r)",
                         ref.host, self.owner.host_id)
            return None
        if ref.tier == "host":
            region = self.mappings.region(ref.path, ref.offset, ref.nbytes)
            if region is None:
                return None
            self.metrics.bytes_read_local.inc(ref.nbytes)
            return region if ref.lease_id else bytearray(region)
        if ref.tier == "disk":
            return _read_file(ref.path, ref.nbytes)
        return None

    async def _read_remote(self, ref: common_pb2.TensorRef):
        if not ref.data_address or ref.owner == self.owner.owner_id:
            return None
        attributes = {"mmcache.bytes": ref.nbytes, "mmcache.tier": ref.tier, "mmcache.peer": ref.data_address}
        with tracing.span("mmcache.transfer", attributes):
            fetched = await self.data_client.fetch(ref.data_address, ref.key, ref.lease_id, nbytes=ref.nbytes)
        if fetched is None:
            return None
        header, data = fetched
        if header.get("checksum") != ref.checksum or int(header.get("nbytes", -1)) != ref.nbytes:
            raise CorruptEntryError("owner's header differs from the ref")
        checked = await self._verify([(data, ref.checksum)])
        if not checked[0]:
            raise CorruptEntryError("streamed bytes fail their checksum")
        self.metrics.bytes_read_remote.inc(len(data))
        log.debug("streamed %s (%d bytes) from its owner", ref.key, len(data))
        return data

    def _acquire_for_send(self, key: str, lease_id: str):
        """Data-server hook: pin the entry while its bytes go out."""
        entry = self.store.get(key)
        if entry is None:
            return None
        send_lease = self.store.lease(key, 300.0)
        data = self.store.host_bytes(key)
        header = {"dtype": entry.meta["dtype"], "shape": entry.meta["shape"], "nbytes": entry.nbytes,
                  "checksum": entry.meta["checksum"]}
        return header, data, lambda: self.store.release(key, send_lease)

    async def release(self, refs: Sequence[common_pb2.TensorRef]) -> None:
        """The consumer is done with these refs: their leases end (ephemeral entries are freed).
        Best effort for other owners (short timeout); the lease deadline is the backstop."""
        by_owner: dict[str, list[tuple[str, str]]] = {}
        for ref in refs:
            if ref.lease_id:
                by_owner.setdefault(ref.control_address if ref.owner != self.owner.owner_id else "",
                                    []).append((ref.key, ref.lease_id))
        for address, pairs in by_owner.items():
            if not address:
                await self.release_local(pairs)
            else:
                await self._remote_release(address, pairs)

    async def release_local(self, pairs: Sequence[tuple[str, str]]) -> int:
        """End leases on this owner's entries; returns how many were live."""
        released = sum(self.store.release(key, lease_id) for key, lease_id in pairs)
        self._space_freed.set()
        await self._sync_index()
        return released

    async def _remote_release(self, address: str, pairs: list[tuple[str, str]]) -> None:
        request = cache_pb2.ReleaseRequest(leases=[cache_pb2.LeaseRelease(key=k, lease_id=i) for k, i in pairs])
        try:
            await cache_pb2_grpc.CacheControlStub(self._channel(address)).Release(request, timeout=CONTROL_TIMEOUT_S)
        except grpc.RpcError as exc:
            log.warning("release of %d leases at %s failed (%s); they expire on their own", len(pairs), address,
                        exc.code())

    def lease_local(self, key: str, lease_s: float) -> str:
        """Control-service hook: lease one of this owner's entries for a remote reader."""
        return self.store.lease(key, lease_s) or ""

    def stats(self) -> cache_pb2.StatsResponse:
        """What this owner holds now (entries by key kind, bytes per tier, leases, counters)."""
        kinds: dict[str, int] = {}
        for key in self.store.keys():
            kinds[key.split(":", 1)[0]] = kinds.get(key.split(":", 1)[0], 0) + 1
        now = time.monotonic()
        leases = sum(len([d for d in e.leases.values() if d > now]) for e in self.store.entries.values())
        counters = {name: self.metrics.value(name) for name in
                    ("hits", "misses", "corrupt", "bytes_put", "bytes_read_local", "bytes_read_remote")}
        return cache_pb2.StatsResponse(
            owner=self.owner.owner_id, entries_by_kind=kinds, used_bytes=self.store.used_bytes(),
            capacity_bytes={n: t.capacity_bytes for n, t in self.store.tiers.items()}, leases=leases,
            index_available=self.available, counters=counters)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = aio_channel(address, credentials=self.credentials)
        return self._channels[address]

    # ---- readiness (layer-wise publishing) -----------------------------------------------------------

    async def publish_ready(self, prefix: str, event: dict[str, str], *, ttl_s: float) -> None:
        """Append `event`; with tracing on it also carries the publisher's traceparent, so a follower
        can make its spans children of the publisher's (`tracing.remote_span(event)`)."""
        await self.ready.publish(prefix, tracing.inject(dict(event)), ttl_s=ttl_s)

    def follow_ready(self, prefix: str, *, timeout_s: float):
        return self.ready.follow(prefix, timeout_s=timeout_s)

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def _beat(self, *, first: bool = False) -> None:
        try:
            if first or self.available:
                await self.registry.heartbeat()
            elif await self.guard.probe():
                await self.registry.heartbeat()
        except CacheUnavailableError:
            pass

    async def _maintain(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            await self._beat()
            if self.store.sweep():
                self._space_freed.set()
            await self._sync_index()
            beats += 1
            if beats % JANITOR_EVERY == 0 and self.available:
                try:
                    await self.registry.collect_dead()
                except CacheUnavailableError:
                    pass

    async def close(self) -> None:
        """Drop this owner's index entries and registration, free its memory and files, close
        connections. Idempotent; Redis being down does not stop it."""
        if self._closed:
            return
        self._closed = True
        if self._process_beat is not None:   # before unregistering: it would bring the live key back
            await asyncio.to_thread(self._process_beat.stop)
        await _stop(self._tasks)
        if self.data_server is not None:
            await self.data_server.close()
        try:
            await self.registry.unregister(self.store.keys())
        except (CacheUnavailableError, UnavailableError):
            log.warning("Redis unavailable at close: this owner's entries expire from the index by TTL")
        self.store.close()
        remove_owner_files(pathlib.Path(self.owner.store_dir), self.owner.owner_id)
        self.data_client.close()
        self.mappings.clear()
        self._workers.shutdown()
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)
        await self.redis.aclose()


def _build_store(config: CacheConfig, store_dir: pathlib.Path, owner_id: str) -> TieredStore:
    host = HostTier(SharedMemoryPool(pool_file(store_dir, owner_id), config.capacity_bytes,
                                     preallocate=config.preallocate_pool))
    device = DeviceTier(config.device_tier, config.device_capacity_bytes) if config.device_tier else None
    disk = None
    if config.disk_capacity_bytes > 0:
        base = pathlib.Path(config.disk_dir) if config.disk_dir else store_dir
        disk = DiskTier(disk_dir(base, owner_id), config.disk_capacity_bytes)
    return TieredStore(host, device, disk)


def _span_attributes(refs: Sequence[common_pb2.TensorRef | None]) -> dict:
    present = [ref for ref in refs if ref is not None]
    return {"mmcache.entries": len(refs), "mmcache.bytes": sum(ref.nbytes for ref in present),
            "mmcache.tier": ",".join(sorted({ref.tier for ref in present}))}


def _on_device(tensor, store: TieredStore) -> bool:
    device = store.tiers.get("device")
    return device is not None and tensor.device == device.device


async def _stop(tasks: list[asyncio.Task]) -> None:
    """Cancel tasks and wait until they end, cancelling again each second: a cancellation can be
    lost inside a Redis call (the owner's background loop once outlived close() that way)."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)


def _tensor_view(view: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(view, dtype=torch.uint8).view(dtype).view(shape)


def _worker_count() -> int:
    import os

    return max(1, min(4, len(os.sched_getaffinity(0))))


def _copy_and_checksum(destination: memoryview, source: memoryview) -> str:
    _copy(destination, source)
    return checksum(destination)


def _copy(destination: memoryview, source: memoryview) -> None:
    import numpy as np

    np.copyto(np.frombuffer(destination, dtype=np.uint8), np.frombuffer(source, dtype=np.uint8))


def _call(fn, *args):
    return fn(*args)


def _slices(nbytes: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous [start, end) ranges covering nbytes, cut on 4 KiB boundaries."""
    step = -(-nbytes // parts // 4096) * 4096 or nbytes
    return [(start, min(start + step, nbytes)) for start in range(0, nbytes, step)]


def _verified_sync(data, expected: str) -> bool:
    try:
        verify(data, expected)
        return True
    except CorruptEntryError:
        return False


def _read_file(path: str, nbytes: int):
    try:
        data = bytearray(nbytes)
        with open(path, "rb") as f:
            if f.readinto(data) != nbytes:
                return None
        return data
    except OSError:
        return None


_OWNER_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def _check_ref(ref: common_pb2.TensorRef) -> None:
    """CorruptEntryError unless the ref's dtype / shape / nbytes agree (`codec.check_layout`) and the
    file it names is one of its owner's mmcache files (pool-<owner>.shm or disk-<owner>/<entry>),
    so a crafted ref cannot make a reader map or read any other file."""
    check_layout(name_of_proto_dtype(ref.dtype), tuple(ref.shape), ref.nbytes)
    if ref.offset < 0:
        raise CorruptEntryError(f"negative offset {ref.offset}")
    if not ref.path:
        return
    path = pathlib.PurePosixPath(ref.path)
    named = {"host": path.name == f"pool-{ref.owner}.shm", "disk": path.parent.name == f"disk-{ref.owner}"}
    if (not _OWNER_ID.match(ref.owner) or ".." in path.parts
            or not named.get(ref.tier, False)):
        raise CorruptEntryError("the ref names a file that is not its owner's cache file")


def _ref_from_index(entry: IndexEntry) -> common_pb2.TensorRef:
    return common_pb2.TensorRef(
        key=entry.key, dtype=proto_dtype(entry.dtype), shape=entry.shape, nbytes=entry.nbytes,
        checksum=entry.checksum, owner=entry.owner, host=entry.host, control_address=entry.control_address,
        data_address=entry.data_address, tier=entry.tier, path=entry.path, offset=entry.offset)


def _with_lease(ref: common_pb2.TensorRef, lease_id: str) -> common_pb2.TensorRef:
    copy = common_pb2.TensorRef()
    copy.CopyFrom(ref)
    copy.lease_id = lease_id
    return copy


class SyncMMCache:
    """Blocking facade over MMCache (tests, CLI): runs it on a private loop in a daemon thread."""

    def __init__(self, config: CacheConfig, identity: CacheIdentity, credentials: Credentials = NO_CREDENTIALS) -> None:
        import threading

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="mmcache-sync")
        self._thread.start()
        self.cache: MMCache = self._call(MMCache.open(config, identity, credentials))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def put_many(self, items, **kwargs):
        return self._call(self.cache.put_many(items, **kwargs))

    def put(self, key, tensor, **kwargs):
        return self._call(self.cache.put(key, tensor, **kwargs))

    def lookup_many(self, keys, **kwargs):
        return self._call(self.cache.lookup_many(keys, **kwargs))

    def get_many(self, refs):
        return self._call(self.cache.get_many(refs))

    def release(self, refs) -> None:
        self._call(self.cache.release(refs))

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self.cache.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> "SyncMMCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
