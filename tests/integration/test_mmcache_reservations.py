"""Reserved entries against a real redis-server: memory first, bytes later (prefill reserves a
prompt's KV before computing it). All or nothing; a reservation waits, in arrival order, for room
that leases being released make; it fails with RESOURCE_EXHAUSTED when it can never fit or did not
in time; abandoning gives everything back exactly once."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from epdserve.errors import ResourceExhaustedError
from mmcache.client import MMCache
from mmcache.codec import checksum, tensor_bytes
from mmcache.pool import region_bytes

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture
async def cache(open_cache):
    return await open_cache(capacity_bytes=4 * MiB)


@pytest.fixture
async def reader(open_cache):
    return await open_cache("reader")


def _floats(nbytes: int) -> tuple[tuple[int, ...], torch.dtype]:
    return (nbytes // 4,), torch.float32


def _sample(metric, suffix: str = "") -> float:
    """A metric's value as a scrape sees it (`suffix`: a histogram's _count or _sum)."""
    return next(s.value for s in metric.collect()[0].samples if s.name.endswith(suffix))


def _used(cache: MMCache) -> int:
    return cache.store.tiers["host"].pool.used_bytes


async def test_reserved_regions_become_entries_holding_what_was_written(cache, reader):
    written, copied = torch.randn(1000), torch.randn(2, 500).to(torch.bfloat16)
    regions = await cache.reserve_tensors([((1000,), torch.float32), ((2, 500), torch.bfloat16)], timeout_s=1)
    regions[0].tensor.copy_(written)                # bytes written in place (a GPU copy, in prefill)
    refs = await cache.commit_reserved([("kv:a", regions[0], None), ("kv:b", regions[1], copied)],
                                       ttl_s=60, lease_s=60, ephemeral=True)
    assert [r.checksum for r in refs] == [checksum(tensor_bytes(written)), checksum(tensor_bytes(copied))]
    got = await reader.get_many(refs)               # another process, reading the pool in place
    assert torch.equal(got[0], written) and torch.equal(got[1], copied)
    await cache.release(refs)                      # (the owner ends the reader's leases: no control server here)
    assert _used(cache) == 0                        # ephemeral: freed with their last lease
    cache.abandon(regions)                          # committed: nothing to give back
    assert _used(cache) == 0


async def test_a_reservation_waits_for_released_space_holding_nothing_meanwhile(cache, monkeypatch):
    from mmcache import client as client_module

    monkeypatch.setattr(client_module, "SPACE_POLL_S", 30.0)   # only the release can wake it in time
    held = await cache.put("kv:held", torch.zeros(3 * MiB // 4), ttl_s=60, lease_s=60, ephemeral=True)
    used = _used(cache)
    waiting = asyncio.ensure_future(cache.reserve_tensors([_floats(3 * MiB // 4)] * 2, timeout_s=10))
    await asyncio.sleep(0.3)
    assert not waiting.done() and _used(cache) == used   # half of it would fit now: all or nothing
    started = time.monotonic()
    await cache.release([held])
    regions = await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - started < 2                  # woken by the release (polling would take 30 s)
    assert len(regions) == 2 and _used(cache) == 3 * MiB // 2
    assert _sample(cache.metrics.pool_used) == _used(cache) and _sample(cache.metrics.pool_capacity) == 4 * MiB
    assert _sample(cache.metrics.reserve_wait, "_count") == 1 and _sample(cache.metrics.reserve_wait, "_sum") >= 0.3
    cache.abandon(regions)
    cache.abandon(regions)                                 # twice: given back once
    assert _used(cache) == 0


async def test_waiting_reservations_are_served_in_arrival_order(cache):
    held = await cache.put("kv:held", torch.zeros(3 * MiB // 4), ttl_s=60, lease_s=60, ephemeral=True)
    order = []

    async def reserve(name: str, nbytes: int):
        regions = await cache.reserve_tensors([_floats(nbytes)], timeout_s=10)
        order.append(name)
        return regions

    first = asyncio.ensure_future(reserve("large", 2 * MiB))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(reserve("small", MiB // 2))   # would fit now, but comes later
    await asyncio.sleep(0.3)
    assert order == []
    await cache.release([held])
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert order == ["large", "small"]
    cache.abandon(first.result() + second.result())
    assert _used(cache) == 0


async def test_no_room_in_time_or_ever_is_resource_exhausted(cache):
    await cache.put("kv:held", torch.zeros(3 * MiB // 4), ttl_s=60, lease_s=60, ephemeral=True)
    used = _used(cache)
    started = time.monotonic()
    with pytest.raises(ResourceExhaustedError, match=r"found no room in the cache pool within 0.3 s") as late:
        await cache.reserve_tensors([_floats(2 * MiB)], timeout_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2 and late.value.retry_after_s
    started = time.monotonic()
    with pytest.raises(ResourceExhaustedError, match=r"entries \(6291456 bytes\) cannot fit the cache pool .* "
                                                     r"raise --capacity-bytes"):
        await cache.reserve_tensors([_floats(3 * MiB)] * 2, timeout_s=30)
    assert time.monotonic() - started < 0.2                 # can never fit: at once, not after 30 s
    assert _used(cache) == used
    assert cache.metrics.value("reserve_refused") == 2


async def test_unleased_entries_are_evicted_to_make_room_only_when_that_is_enough(cache):
    await cache.put("kvb:old", torch.zeros(MiB // 4), ttl_s=60)                 # cached, nobody holds it
    await cache.put("kv:held", torch.zeros(5 * MiB // 8), ttl_s=60, lease_s=60)  # 2.5 MiB a reader holds
    with pytest.raises(ResourceExhaustedError):          # 0.5 MiB free + 1 MiB evictable < 2 MiB
        await cache.reserve_tensors([_floats(2 * MiB)], timeout_s=0.3)
    assert cache.store.get("kvb:old") is not None         # a failed attempt evicted nothing
    regions = await cache.reserve_tensors([_floats(MiB)], timeout_s=0)
    assert cache.store.get("kvb:old") is None             # this one needed it gone, and fits
    cache.abandon(regions)


async def test_room_is_counted_only_as_far_as_a_reservation_needs(cache, monkeypatch):
    """A reservation or a load report must not walk every cached entry (a prefill's pool holds many
    thousands of prefix blocks): what is evictable is counted only until it is enough."""
    from mmcache.store import Entry

    for i in range(300):
        await cache.put(f"kvb:{i}", torch.zeros(256), ttl_s=60)              # unleased: evictable
    await cache.put("kv:held", torch.zeros(MiB // 8), ttl_s=60, lease_s=60)  # a reader holds it
    free = cache.store.tiers["host"].pool.free_bytes
    evictable = sum(region_bytes(1024) for _ in range(300))
    looked_at = []
    real_leased = Entry.leased
    monkeypatch.setattr(Entry, "leased", lambda entry, now: looked_at.append(entry.key) or real_leased(entry, now))

    assert cache.room_bytes() == free + evictable and len(looked_at) == 301          # the full count
    looked_at.clear()
    assert cache.room_bytes(enough=free) == free and looked_at == []                 # free room is enough
    assert free + region_bytes(1024) <= cache.room_bytes(enough=free + 1) < free + evictable
    assert len(looked_at) == 1                                                       # one entry was enough
    looked_at.clear()
    assert cache.room_bytes(enough=2 * (free + evictable)) == free + evictable       # exact below `enough`
    looked_at.clear()
    regions = await cache.reserve_tensors([_floats(free // 2)], timeout_s=0)
    assert looked_at == []                  # a reservation that fits the free room looks at no entry
    cache.abandon(regions)


async def test_the_time_limit_covers_waiting_behind_other_reservations(cache):
    await cache.put("kv:held", torch.zeros(3 * MiB // 4), ttl_s=60, lease_s=60, ephemeral=True)
    first = asyncio.ensure_future(cache.reserve_tensors([_floats(2 * MiB)], timeout_s=10))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(ResourceExhaustedError, match=r"within 0.2 s \(--my-flag\)"):
        await cache.reserve_tensors([_floats(MiB // 4)], timeout_s=0.2, wait_flag="--my-flag")
    assert time.monotonic() - started < 1
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)


async def test_what_the_caller_holds_in_the_pool_counts_against_never_fitting(cache):
    started = time.monotonic()
    with pytest.raises(ResourceExhaustedError, match=r"the KV \(3145728 bytes\) next to the 2097152 bytes it holds"):
        await cache.reserve_tensors([_floats(3 * MiB)], timeout_s=30, held_bytes=2 * MiB, what="the KV")
    assert time.monotonic() - started < 0.2


async def test_giving_back_a_region_twice_never_frees_someone_elses(cache):
    (first,) = await cache.reserve_tensors([_floats(MiB)], timeout_s=1)
    cache.abandon([first])
    (second,) = await cache.reserve_tensors([_floats(MiB)], timeout_s=1)
    assert second.reservation.offset == first.reservation.offset     # the same place, reserved again
    cache.abandon([first])                                             # a stale give-back
    assert _used(cache) == MiB
    refs = await cache.commit_reserved([("kv:x", second, None)], ttl_s=60)
    assert len(refs) == 1 and _used(cache) == MiB


async def test_a_failed_commit_gives_its_regions_back(cache, monkeypatch):
    from mmcache import client as client_module

    regions = await cache.reserve_tensors([_floats(MiB)], timeout_s=1)

    def broken(*args):
        raise OSError("disk on fire")

    monkeypatch.setattr(client_module, "checksum", broken)
    with pytest.raises(OSError):
        await cache.commit_reserved([("kv:x", regions[0], None)], ttl_s=60)
    assert _used(cache) == 0 and cache.store.get("kv:x") is None
    cache.abandon(regions)
    assert _used(cache) == 0


async def test_the_pool_page_locks_only_with_a_gpu(cache):
    if torch.cuda.is_available():
        assert cache.page_lock_pool() and cache.page_locked
    else:
        assert not cache.page_lock_pool() and not cache.page_locked   # refused, logged, pool still works
    regions = await cache.reserve_tensors([_floats(MiB)], timeout_s=1)
    cache.abandon(regions)


async def test_the_pool_is_page_locked_before_the_first_heartbeat(redis_url, namespace, tmp_path, monkeypatch):
    """Registering a large pool with CUDA holds the event loop for seconds (10.7 s for 24 GiB on an
    H100 host): done after the owner's first heartbeat, other owners' janitors took it for dead."""
    from epdserve.config import CacheConfig
    from epdserve.engine import host_memory
    from mmcache.client import CacheIdentity
    from mmcache.owners import OwnerRegistry

    events = []
    monkeypatch.setattr(host_memory, "page_lock", lambda address, nbytes, what="": events.append("page_lock"))
    monkeypatch.setattr(host_memory, "unpin", lambda addresses: None)
    beat = OwnerRegistry.heartbeat

    async def recorded_heartbeat(self):
        events.append("heartbeat")
        await beat(self)

    monkeypatch.setattr(OwnerRegistry, "heartbeat", recorded_heartbeat)
    config = CacheConfig(redis_url=redis_url, namespace=namespace, shm_dir=str(tmp_path / "p"), capacity_bytes=MiB)
    cache = await MMCache.open(config, CacheIdentity("p", ""), page_lock_pool=True)
    try:
        assert cache.page_locked and events[:2] == ["page_lock", "heartbeat"]
    finally:
        await cache.close()


def test_reserved_host_refuses_writes_once_closed():
    from services.prefill.layer_kv import LayerWritesClosed, ReservedHost

    regions = [torch.zeros(2, 3), torch.zeros(2, 3)]
    host = ReservedHost(regions)
    kv = torch.randn(2, 3)
    out, ready = host.take(0, kv, None)
    ready()
    assert out is regions[0] and torch.equal(regions[0], kv)
    with pytest.raises(ValueError, match=r"layer 1: KV \(3, 2\) .* does not fit its reserved region \(2, 3\)"):
        host.take(1, torch.randn(3, 2), None)
    host.close()
    with pytest.raises(LayerWritesClosed):
        host.take(1, kv, None)
    assert torch.equal(regions[1], torch.zeros(2, 3))


async def test_concurrent_puts_of_one_content_key_keep_the_first_readers_bytes(cache):
    """Two requests publish the same image at once (both miss, both encode): the second put must
    not replace the entry the first already handed out under a lease, whose region would then be
    freed and reused under its reader (seen on an H100: one in-place read failed its checksum)."""
    image = torch.randn(MiB // 2)  # large enough to be copied in worker threads (the racy path)
    first, second = await asyncio.gather(
        cache.put_many([("img:same", image.clone())], ttl_s=60, lease_s=60),
        cache.put_many([("img:same", image.clone())], ttl_s=60, lease_s=60))
    assert first[0].offset == second[0].offset, "the second put moved the entry out from under a lease"
    assert _used(cache) == region_bytes(image.numel() * 4), "an abandoned reservation still holds pool bytes"
    got = await cache.get_many([first[0], second[0]])
    assert all(torch.equal(t, image) for t in got) and cache.metrics.value("corrupt") == 0
    await cache.release([first[0], second[0]])
