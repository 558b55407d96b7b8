"""TieredStore: what one owner holds, in which tier, for how long, and who may still read it.

Invariants:
* an entry lives in exactly one tier; its bytes never change while it lives there;
* an entry with an unexpired lease is never evicted, demoted or freed (a lease covers an
  in-flight hand-off or read: the reader's zero-copy view stays valid until it releases);
* each tier evicts least-recently-used unleased entries first; eviction demotes one tier down
  (device -> host -> disk) and drops from the last tier; a read through `lease` promotes a disk
  entry back to host;
* an ephemeral entry (a hand-off, e.g. KV for one decode) is freed when its last lease ends;
  any entry is freed when its TTL passes and it holds no lease.
Used from the owner's event loop only.
"""

from __future__ import annotations

import dataclasses
import pathlib
import secrets
import shutil
import tempfile
import time
from collections import OrderedDict

from epdserve.errors import ResourceExhaustedError
from mmcache.pool import region_bytes
from mmcache.tiers import DeviceTier, DiskTier, HostTier, Location


class CapacityError(ResourceExhaustedError):
    """No tier can take the entry (too large, or everything else is leased)."""


@dataclasses.dataclass
class Entry:
    key: str
    nbytes: int
    meta: dict                       # dtype, shape, checksum
    tier: str
    handle: object                   # device tensor | pool offset | disk path
    expires_at: float
    ephemeral: bool
    leases: dict[str, float] = dataclasses.field(default_factory=dict)  # lease id -> deadline

    def leased(self, now: float) -> bool:
        return any(deadline > now for deadline in self.leases.values())


@dataclasses.dataclass(frozen=True)
class PutResult:
    entry: Entry
    lease_id: str                    # "" when no lease was asked for


@dataclasses.dataclass(frozen=True)
class Reservation:
    offset: int
    nbytes: int
    view: memoryview                 # where to write the entry's bytes


@dataclasses.dataclass
class Changes:
    """What the index must learn: keys that left the store, keys whose location changed."""

    dropped: list[str] = dataclasses.field(default_factory=list)
    moved: list[str] = dataclasses.field(default_factory=list)


def default_store_dir(owner_id: str) -> pathlib.Path:
    shm = pathlib.Path("/dev/shm")
    base = shm if shm.is_dir() and _writable(shm) else pathlib.Path(tempfile.gettempdir())
    return base / f"epdserve-{owner_id}"


def _writable(path: pathlib.Path) -> bool:
    import os

    return os.access(path, os.W_OK)


class TieredStore:
    def __init__(self, host: HostTier, device: DeviceTier | None = None, disk: DiskTier | None = None,
                 directory: pathlib.Path | None = None) -> None:
        self.tiers = {t.name: t for t in (device, host, disk) if t is not None}
        self.order = [name for name in ("device", "host", "disk") if name in self.tiers]
        self.lru: dict[str, OrderedDict[str, None]] = {name: OrderedDict() for name in self.order}
        self.entries: dict[str, Entry] = {}
        self.directory = directory
        self._changes = Changes()

    def drain_changes(self) -> Changes:
        """Keys dropped or moved (by eviction, promotion or sweeping) since the last call."""
        changes, self._changes = self._changes, Changes()
        changes.moved = [k for k in dict.fromkeys(changes.moved) if k in self.entries]
        changes.dropped = [k for k in dict.fromkeys(changes.dropped) if k not in self.entries]
        return changes

    # ---- writing ---------------------------------------------------------------------------------

    def put(self, key: str, value, meta: dict, *, ttl_s: float, ephemeral: bool = False,
            lease_s: float | None = None) -> PutResult:
        """Store `value` (a tensor or host bytes) under key, replacing any previous entry, in the
        highest tier that can take it (device only for tensors already on that device)."""
        self.delete(key)
        nbytes = _nbytes(value)
        first = self._first_tier(value)
        for name in self.order[self.order.index(first):]:
            handle = self._store_in(name, key, value)
            if handle is not None:
                entry = Entry(key, nbytes, dict(meta), name, handle, time.monotonic() + ttl_s, ephemeral)
                self._link(entry)
                lease_id = self._new_lease(entry, lease_s) if lease_s else ""
                return PutResult(entry, lease_id)
        raise CapacityError(f"no cache tier can hold an entry of {nbytes} bytes")

    def reserve_host(self, nbytes: int) -> Reservation | None:
        """A host-pool region for an entry to be filled outside the event loop (copy + checksum in a
        thread), evicting as needed; None when the pool cannot make room. The region is invisible
        (not linked, never an eviction victim) until `commit`, and must be committed or abandoned."""
        if "host" not in self.tiers:
            return None
        host = self.tiers["host"]
        offset = host.pool.allocate(nbytes)
        while offset is None and self._evict_one("host"):
            offset = host.pool.allocate(nbytes)
        return None if offset is None else Reservation(offset, nbytes, host.pool.view(offset, nbytes))

    def commit(self, key: str, reservation: Reservation, meta: dict, *, ttl_s: float, ephemeral: bool = False,
               lease_s: float | None = None) -> PutResult:
        self.delete(key)
        entry = Entry(key, reservation.nbytes, dict(meta), "host", reservation.offset, time.monotonic() + ttl_s,
                      ephemeral)
        self._link(entry)
        return PutResult(entry, self._new_lease(entry, lease_s) if lease_s else "")

    def abandon(self, reservation: Reservation) -> None:
        self.tiers["host"].pool.free(reservation.offset, reservation.nbytes)

    def _first_tier(self, value) -> str:
        device = self.tiers.get("device")
        if device is not None and hasattr(value, "device") and value.device == device.device:
            return "device"
        return "host" if "host" in self.tiers else self.order[0]

    def _store_in(self, name: str, key: str, value):
        tier = self.tiers[name]
        data = value if name == "device" else _host_view(value)
        handle = tier.store(key, data)
        while handle is None and self._evict_one(name):
            handle = tier.store(key, data)
        return handle

    def _evict_one(self, name: str) -> bool:
        """Move the least-recently-used unleased entry of a tier one tier down (or drop it)."""
        now = time.monotonic()
        victim = next((k for k in self.lru[name] if not self.entries[k].leased(now)), None)
        if victim is None:
            return False
        entry = self.entries[victim]
        lower = self.order[self.order.index(name) + 1:]
        data = self.tiers[name].host_bytes(entry.handle, entry.nbytes)
        for target in lower:  # the lower tier makes room the same way (cascading demotion)
            handle = self._store_in(target, victim, data)
            if handle is not None:
                self._unlink(entry)
                self.tiers[name].free(entry.handle, entry.nbytes)
                entry.tier, entry.handle = target, handle
                self._link(entry)
                self._changes.moved.append(victim)
                return True
        self._drop(entry)
        return True

    # ---- leases ----------------------------------------------------------------------------------

    def evictable_bytes(self, tier: str, enough: int | None = None) -> int:
        """Pool bytes the tier's unleased entries take (what eviction could free now), counted in
        eviction order and only until `enough` is reached: a full count walks every entry, which a
        reservation or load report cannot afford once the cache holds many thousands."""
        now, total = time.monotonic(), 0
        for key in self.lru[tier]:
            entry = self.entries[key]
            if not entry.leased(now):
                total += region_bytes(entry.nbytes)
                if enough is not None and total >= enough:
                    break
        return total

    def lease(self, key: str, lease_s: float) -> str | None:
        """Pin an entry for a reader (promoting a disk entry to host); None if the key is gone."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.touch(key)
        if entry.tier == "disk" and "host" in self.tiers:
            self._promote(entry)
        return self._new_lease(entry, lease_s)

    def _new_lease(self, entry: Entry, lease_s: float) -> str:
        lease_id = secrets.token_hex(8)
        entry.leases[lease_id] = time.monotonic() + lease_s
        return lease_id

    def _promote(self, entry: Entry) -> None:
        data = self.tiers["disk"].host_bytes(entry.handle, entry.nbytes)
        self._unlink(entry)  # not its own eviction victim while room is made
        handle = self._store_in("host", entry.key, data)
        if handle is None:
            self._link(entry)
            return
        self.tiers["disk"].free(entry.handle, entry.nbytes)
        entry.tier, entry.handle = "host", handle
        self._link(entry)
        self._changes.moved.append(entry.key)

    def release(self, key: str, lease_id: str) -> bool:
        """End one lease (freeing an ephemeral entry whose last lease it was). Returns whether
        the lease was live."""
        entry = self.entries.get(key)
        if entry is None or entry.leases.pop(lease_id, None) is None:
            return False
        if entry.ephemeral and not entry.leased(time.monotonic()):
            self._drop(entry)
        return True

    # ---- reading ---------------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def touch(self, key: str, ttl_s: float | None = None) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            self.lru[entry.tier].move_to_end(key)
            if ttl_s is not None:
                entry.expires_at = max(entry.expires_at, time.monotonic() + ttl_s)

    def host_bytes(self, key: str) -> memoryview | None:
        """The entry's bytes in host memory (a view for host entries, a copy otherwise)."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        return self.tiers[entry.tier].host_bytes(entry.handle, entry.nbytes)

    def location(self, key: str) -> Location | None:
        entry = self.entries.get(key)
        return None if entry is None else self.tiers[entry.tier].location(entry.handle)

    # ---- freeing ---------------------------------------------------------------------------------

    def delete(self, key: str) -> bool:
        entry = self.entries.get(key)
        if entry is None:
            return False
        self._drop(entry)
        return True

    def sweep(self, now: float | None = None) -> list[str]:
        """Drop expired leases, then every entry past its TTL (or ephemeral) with no lease left."""
        now = time.monotonic() if now is None else now
        dropped = []
        for entry in list(self.entries.values()):
            live = {k: d for k, d in entry.leases.items() if d > now}
            lapsed, entry.leases = len(live) < len(entry.leases), live
            if not live and (entry.expires_at <= now or (entry.ephemeral and lapsed)):
                self._drop(entry)
                dropped.append(entry.key)
        return dropped

    def _link(self, entry: Entry) -> None:
        self.entries[entry.key] = entry
        self.lru[entry.tier][entry.key] = None

    def _unlink(self, entry: Entry) -> None:
        self.lru[entry.tier].pop(entry.key, None)

    def _drop(self, entry: Entry) -> None:
        self._unlink(entry)
        self.entries.pop(entry.key, None)
        self.tiers[entry.tier].free(entry.handle, entry.nbytes)
        self._changes.dropped.append(entry.key)

    def keys(self) -> list[str]:
        return list(self.entries)

    def used_bytes(self) -> dict[str, int]:
        return {name: tier.used_bytes for name, tier in self.tiers.items()}

    def close(self) -> None:
        self.entries.clear()
        for tier in self.tiers.values():
            tier.close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def _nbytes(value) -> int:
    if hasattr(value, "element_size"):
        return value.numel() * value.element_size()
    return len(value)


def _host_view(value) -> memoryview:
    if hasattr(value, "element_size"):
        from mmcache.codec import tensor_bytes

        return tensor_bytes(value)
    return memoryview(value)
