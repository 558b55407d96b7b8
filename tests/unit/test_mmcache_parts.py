"""mmcache building blocks without Redis: keys, codec, the shared-memory store."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from mmcache.codec import CorruptEntryError, checksum, tensor_bytes, tensor_from_buffer, verify
from mmcache.keys import image_key, processor_digest, validate_key
from mmcache.pool import PoolMappings, SharedMemoryPool
from mmcache.store import CapacityError, TieredStore
from mmcache.tiers import DeviceTier, DiskTier, HostTier

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _key(image, **overrides):
    args = {"model_revision": "rev1", "processor_digest": "proc1", **overrides}
    return image_key(image, **args)


def test_image_key_is_stable_across_processes_and_hash_seeds():
    code = ("from PIL import Image; from mmcache.keys import image_key; "
            "print(image_key(Image.new('RGB', (5, 3), (1, 2, 3)), model_revision='r', processor_digest='p'))")
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert outputs.pop().strip() == _key(Image.new("RGB", (5, 3), (1, 2, 3)), model_revision="r", processor_digest="p")


def test_image_key_distinguishes_everything_that_matters():
    base = Image.new("RGB", (4, 6), (10, 20, 30))
    keys = {
        _key(base),
        _key(Image.frombytes("RGB", (6, 4), base.tobytes())),          # same bytes, transposed size
        _key(Image.frombytes("L", (12, 6), base.tobytes())),           # same bytes, other mode
        _key(Image.new("RGB", (4, 6), (10, 20, 31))),                  # one channel differs
        _key(base, model_revision="rev2"),
        _key(base, processor_digest="proc2"),
        _key(base, tenant_salt=b"tenant-a"),
    }
    assert len(keys) == 7
    assert _key(base) == _key(base.copy())


def test_processor_digest_ignores_key_order():
    assert processor_digest({"a": 1, "b": [1, 2]}) == processor_digest({"b": [1, 2], "a": 1})
    assert processor_digest({"a": 1}) != processor_digest({"a": 2})


@pytest.mark.parametrize("key", ["", "x" * 201, "a/b", "../etc/passwd", "key with space", "é"])
def test_bad_keys_are_rejected(key):
    from epdserve.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        validate_key(key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("shape", [(), (0,), (3, 5), (2, 1, 4)])
def test_codec_round_trip(dtype, shape):
    tensor = (torch.randn(shape) * 100).to(dtype)
    data = bytearray(tensor_bytes(tensor))
    name = str(dtype).removeprefix("torch.")
    back = tensor_from_buffer(data, name, shape)
    assert back.dtype == dtype and tuple(back.shape) == shape
    assert torch.equal(back, tensor)


def test_codec_rejects_wrong_length_and_checksum():
    data = bytearray(tensor_bytes(torch.ones(4)))
    with pytest.raises(CorruptEntryError, match="needs 12"):
        tensor_from_buffer(data, "float32", (3,))
    digest = checksum(data)
    verify(data, digest)
    data[0] ^= 1
    with pytest.raises(CorruptEntryError, match="checksum"):
        verify(data, digest)


def _store(tmp_path, host=1000, disk=0, device=0):
    pool = SharedMemoryPool(tmp_path / "pool.shm", host)
    return TieredStore(HostTier(pool), DeviceTier("cpu", device) if device else None,
                       DiskTier(tmp_path / "disk", disk) if disk else None)


META = {"dtype": "uint8", "shape": [0], "checksum": ""}


def test_pool_regions_never_overlap_and_frees_coalesce(tmp_path):
    import random

    pool = SharedMemoryPool(tmp_path / "p.shm", 64 * 1024)
    rng = random.Random(0)
    live: dict[int, int] = {}
    for _ in range(2000):
        if live and rng.random() < 0.45:
            offset = rng.choice(list(live))
            pool.free(offset, live.pop(offset))
        else:
            size = rng.randint(1, 3000)
            offset = pool.allocate(size)
            if offset is not None:
                live[offset] = size
        spans = sorted((o, o + -(-n // 64) * 64) for o, n in live.items())
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "regions overlap"
        free = sorted(pool._free_sizes.items())
        assert all(a[0] + a[1] < b[0] for a, b in zip(free, free[1:])), "free list not coalesced"
        assert pool.used_bytes + sum(pool._free_sizes.values()) == pool.capacity_bytes
    for offset, size in list(live.items()):
        pool.free(offset, size)
    assert pool.largest_free() == pool.capacity_bytes
    pool.close()
    assert not (tmp_path / "p.shm").exists()


def test_a_pool_that_cannot_be_read_in_place_is_a_fallback_said_once(tmp_path, monkeypatch, caplog):
    """A reader's in-place view of an owner's pool: the region's bytes; None (the caller then asks the
    owner's data channel) when the file is gone, a mapping is refused (ENOMEM for a private mapping
    larger than memory) or the bytes lie outside it, with one warning per pool and cause."""
    pool = SharedMemoryPool(tmp_path / "pool.shm", 1 << 16)
    offset = pool.allocate(100)
    pool.view(offset, 100)[:] = bytes(range(100))
    mappings = PoolMappings()
    assert bytes(mappings.region(str(pool.path), offset, 100)) == bytes(range(100))
    with caplog.at_level("WARNING", logger="mmcache.pool"):
        assert mappings.region(str(pool.path), (1 << 16) - 10, 100) is None
        assert mappings.region(str(pool.path), (1 << 16) - 20, 100) is None
        assert mappings.region(str(tmp_path / "gone.shm"), 0, 10) is None
        other = PoolMappings()
        monkeypatch.setattr(PoolMappings, "_map", staticmethod(lambda path, size: (_ for _ in ()).throw(
            OSError(12, "Cannot allocate memory"))))
        assert other.region(str(pool.path), offset, 100) is None
        assert other.region(str(pool.path), offset, 100) is None
    causes = [r.getMessage() for r in caplog.records]
    assert len(causes) == 3, causes
    assert "outside its 65536 mapped bytes" in causes[0] and "not visible here" in causes[1]
    assert "Cannot allocate memory" in causes[2]
    pool.close()


def test_pool_refuses_more_than_the_mount_holds(tmp_path):
    from epdserve.errors import FailedPreconditionError

    with pytest.raises(FailedPreconditionError, match="capacity_bytes .* exceeds the free space"):
        SharedMemoryPool(tmp_path / "p.shm", 1 << 60)


def test_host_bytes_round_trip_and_location(tmp_path):
    store = _store(tmp_path)
    store.put("k1", memoryview(b"abc"), META, ttl_s=60)
    assert bytes(store.host_bytes("k1")) == b"abc"
    where = store.location("k1")
    assert where.tier == "host" and where.path.endswith("pool.shm")
    with open(where.path, "rb") as f:  # what a same-host consumer reads in place
        f.seek(where.offset)
        assert f.read(3) == b"abc"


def test_lru_eviction_demotes_to_disk_then_drops(tmp_path):
    store = _store(tmp_path, host=64 * 3, disk=64 * 2)
    for key in ("a", "b", "c"):
        store.put(key, memoryview(bytes([ord(key)]) * 64), META, ttl_s=60)
    store.touch("a")                                    # a is now most recently used
    store.put("d", memoryview(b"d" * 64), META, ttl_s=60)
    assert store.get("b").tier == "disk" and store.get("a").tier == "host"
    assert store.drain_changes().moved == ["b"]
    store.put("e", memoryview(b"e" * 64), META, ttl_s=60)   # c -> disk
    store.put("f", memoryview(b"f" * 64), META, ttl_s=60)   # a -> disk; disk full: b dropped
    changes = store.drain_changes()
    assert "b" in changes.dropped and store.get("b") is None
    assert bytes(store.host_bytes("c")) == b"c" * 64   # disk entries still read back


def test_lease_promotes_from_disk_and_pins(tmp_path):
    store = _store(tmp_path, host=64 * 2, disk=64 * 4)
    for key in ("a", "b", "c"):
        store.put(key, memoryview(bytes([ord(key)]) * 64), META, ttl_s=60)
    assert store.get("a").tier == "disk"
    lease = store.lease("a", 60)
    assert store.get("a").tier == "host"               # promoted on reuse
    store.put("d", memoryview(b"d" * 64), META, ttl_s=60)
    store.put("e", memoryview(b"e" * 64), META, ttl_s=60)
    assert store.get("a").tier == "host", "a leased entry was evicted"
    assert store.release("a", lease) is True and store.release("a", lease) is False


def test_everything_leased_and_no_lower_tier_is_a_capacity_error(tmp_path):
    store = _store(tmp_path, host=128)
    store.put("a", memoryview(b"x" * 64), META, ttl_s=60, lease_s=60)
    store.put("b", memoryview(b"y" * 64), META, ttl_s=60, lease_s=60)
    with pytest.raises(CapacityError, match="no cache tier can hold"):
        store.put("c", memoryview(b"z" * 64), META, ttl_s=60)
    with pytest.raises(CapacityError):
        store.put("huge", memoryview(b"z" * 1000), META, ttl_s=60)


def test_ephemeral_entry_is_freed_with_its_last_lease(tmp_path):
    store = _store(tmp_path)
    put = store.put("kv:1", memoryview(b"k" * 10), META, ttl_s=60, ephemeral=True, lease_s=60)
    second = store.lease("kv:1", 60)
    assert store.release("kv:1", put.lease_id) and store.get("kv:1") is not None
    assert store.release("kv:1", second) and store.get("kv:1") is None
    assert "kv:1" in store.drain_changes().dropped


def test_expiry_of_ttls_and_leases(tmp_path):
    store = _store(tmp_path)
    store.put("short", memoryview(b"1"), META, ttl_s=0.01)
    store.put("pinned", memoryview(b"2"), META, ttl_s=0.01, lease_s=60)
    store.put("handoff", memoryview(b"3"), META, ttl_s=60, ephemeral=True, lease_s=0.01)
    time.sleep(0.03)
    assert sorted(store.sweep()) == ["handoff", "short"]
    assert store.get("pinned") is not None            # TTL passed, but a lease is live


def test_device_tier_demotes_to_host(tmp_path):
    store = _store(tmp_path, device=64)
    first = torch.arange(16, dtype=torch.int32)        # 64 bytes on the "device" (cpu here)
    store.put("a", first, META, ttl_s=60)
    assert store.get("a").tier == "device"
    store.put("b", torch.arange(16, dtype=torch.int32) * 2, META, ttl_s=60)
    assert store.get("a").tier == "host" and store.get("b").tier == "device"
    assert bytes(store.host_bytes("a")) == first.numpy().tobytes()


def test_close_removes_files(tmp_path):
    store = _store(tmp_path, disk=1000)
    store.put("a", memoryview(b"a"), META, ttl_s=60)
    store.close()
    assert not (tmp_path / "pool.shm").exists() and not (tmp_path / "disk").exists()


def test_prefix_block_keys_chain_like_mooncake():
    from mmcache.keys import prefix_block_keys

    def keys(tokens, spans=(), **kw):
        args = {"model_revision": "r", "kv_settings": "float32", **kw}
        return prefix_block_keys(tokens, 4, image_spans=spans, **args)

    base = list(range(18))                       # 4 full blocks + a partial one
    k = keys(base)
    assert len(k) == 4 and len(set(k)) == 4      # the partial block has no key
    assert keys(base[:16]) == k                  # same prefix, same keys
    changed = base.copy()
    changed[9] = 99                              # a token in block 2
    assert keys(changed)[:2] == k[:2] and all(a != b for a, b in zip(keys(changed)[2:], k[2:]))
    img_a = keys(base, [(2, 6, "img:a")])
    img_b = keys(base, [(2, 6, "img:b")])
    assert img_a[0] != img_b[0] and img_a[1] != img_b[1]  # the image spans blocks 0 and 1
    assert keys(base, [(3, 6, "img:a")])[0] != img_a[0]     # where it sits matters too
    assert keys(base, model_revision="other")[0] != k[0]
    assert keys(base, kv_settings="bfloat16")[0] != k[0]
    assert keys(base, tenant_salt=b"t1")[0] != keys(base, tenant_salt=b"t2")[0]
