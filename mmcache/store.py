"""The owner's side of the bytes: one file per entry in a directory in /dev/shm.

Invariants: a file is only ever created complete (written to a temporary name, then renamed),
never modified or truncated afterwards, so a consumer that mapped it reads consistent bytes even
if the owner unlinks it meanwhile (Linux keeps unlinked mappings valid). Entries are evicted
least-recently-used first when the byte budget is exceeded, and after their TTL. Used from one
asyncio loop (not thread-safe).
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import pathlib
import shutil
import tempfile
import time
from collections import OrderedDict

from epdserve.errors import ResourceExhaustedError


class CapacityError(ResourceExhaustedError):
    """An entry larger than the whole store."""


@dataclasses.dataclass
class StoredEntry:
    path: pathlib.Path
    nbytes: int
    expires_at: float
    meta: dict          # what the owner keeps about the entry (dtype, shape, checksum)


@dataclasses.dataclass(frozen=True)
class WriteResult:
    entry: StoredEntry
    evicted: list[str]  # keys dropped to make room: the caller removes them from the index


def default_shm_dir(owner_id: str) -> pathlib.Path:
    shm = pathlib.Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else pathlib.Path(tempfile.gettempdir())
    return base / f"epdserve-{owner_id}"


class SharedMemoryStore:
    def __init__(self, directory: pathlib.Path, capacity_bytes: int) -> None:
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[str, StoredEntry] = OrderedDict()  # LRU order: oldest first

    def _path(self, key: str) -> pathlib.Path:
        return self.directory / hashlib.sha256(key.encode()).hexdigest()[:40]

    def write(self, key: str, data, ttl_s: float, meta: dict | None = None) -> WriteResult:
        nbytes = len(data)
        if nbytes > self.capacity_bytes:
            raise CapacityError(f"entry of {nbytes} bytes exceeds the cache capacity ({self.capacity_bytes} bytes)")
        self.delete(key)
        evicted = self._make_room(nbytes)
        path = self._path(key)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        entry = StoredEntry(path, nbytes, time.monotonic() + ttl_s, dict(meta or {}))
        self._entries[key] = entry
        self.used_bytes += nbytes
        return WriteResult(entry, evicted)

    def _make_room(self, nbytes: int) -> list[str]:
        evicted = []
        while self._entries and self.used_bytes + nbytes > self.capacity_bytes:
            key = next(iter(self._entries))
            self.delete(key)
            evicted.append(key)
        return evicted

    def get(self, key: str) -> StoredEntry | None:
        return self._entries.get(key)

    def contains(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.path.exists()

    def touch(self, key: str, ttl_s: float) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.expires_at = time.monotonic() + ttl_s
            self._entries.move_to_end(key)

    def open_read(self, key: str) -> memoryview | None:
        """A private (copy-on-write) mapping of the entry's bytes, or None if it is gone."""
        entry = self._entries.get(key)
        return map_file(entry.path) if entry is not None else None

    def delete(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.used_bytes -= entry.nbytes
        entry.path.unlink(missing_ok=True)
        return True

    def expired(self, now: float | None = None) -> list[str]:
        """Delete and return every entry past its TTL."""
        now = time.monotonic() if now is None else now
        keys = [k for k, e in self._entries.items() if e.expires_at <= now]
        for key in keys:
            self.delete(key)
        return keys

    def keys(self) -> list[str]:
        return list(self._entries)

    def close(self) -> None:
        self._entries.clear()
        self.used_bytes = 0
        shutil.rmtree(self.directory, ignore_errors=True)


def map_file(path: pathlib.Path) -> memoryview | None:
    """Map a whole file copy-on-write (writable for torch.frombuffer, never written back)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return memoryview(bytearray())
            return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY))
    except FileNotFoundError:
        return None
