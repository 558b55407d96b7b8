"""The host shared-memory pool: one preallocated file in /dev/shm carved into regions.

Invariant: regions handed out never overlap; the free list is sorted by offset, covers exactly
the bytes not handed out, and never holds two adjacent ranges (frees coalesce). Writes into a
region happen before its entry is published, so a reader that holds a lease on the entry sees
stable bytes. Consumers on the same host map the file once and read regions in place. The owner
holds an exclusive flock on the file for as long as its process lives (the kernel drops it when
the process ends, however it ends): that, not a heartbeat, tells another process on the host
whether the file may be removed (`held_by_a_live_owner`).
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import mmap
import os
import pathlib

log = logging.getLogger(__name__)
ALIGN = 64  # bytes; regions start on cache-line boundaries


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def region_bytes(nbytes: int) -> int:
    """Pool bytes an entry of nbytes takes (regions are aligned, and at least one byte)."""
    return _round_up(max(nbytes, 1))


class SharedMemoryPool:
    """Owner side. Not thread-safe: used from the owner's event loop (and its data-server threads
    only through `view`, which does not change the free list)."""

    def __init__(self, path: pathlib.Path, capacity_bytes: int, *, preallocate: bool = False) -> None:
        """`preallocate`: allocate every page of the file now (posix_fallocate), so first writes
        into a region do not stop to allocate pages (a 1.7 GB fill: 2.9 s -> 0.85 s) and a mount
        that cannot hold the pool fails here, not later."""
        self.path = pathlib.Path(path)
        self.capacity_bytes = _round_up(capacity_bytes)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _check_room(self.path.parent, self.capacity_bytes)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, self.capacity_bytes)
            if preallocate:
                _preallocate(fd, self.capacity_bytes)
            self._map = mmap.mmap(fd, self.capacity_bytes, access=mmap.ACCESS_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd  # held open (and locked) until close(); not inherited by children
        self._buffer = memoryview(self._map)
        self.preallocated = preallocate
        self._page_locked_at: int | None = None  # the pool's address while registered with CUDA
        self._free_offsets: list[int] = [0]
        self._free_sizes: dict[int, int] = {0: self.capacity_bytes}
        self.used_bytes = 0

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a region of at least nbytes, or None when no free range is large enough."""
        size = region_bytes(nbytes)
        for offset in self._free_offsets:
            free = self._free_sizes[offset]
            if free >= size:
                self._take(offset, free, size)
                self.used_bytes += size
                return offset
        return None

    def _take(self, offset: int, free: int, size: int) -> None:
        index = bisect.bisect_left(self._free_offsets, offset)
        del self._free_offsets[index]
        del self._free_sizes[offset]
        if free > size:
            self._insert(offset + size, free - size)

    def free(self, offset: int, nbytes: int) -> None:
        size = region_bytes(nbytes)
        self.used_bytes -= size
        start, end = offset, offset + size
        index = bisect.bisect_left(self._free_offsets, offset)
        if index > 0:  # merge with the range before
            before = self._free_offsets[index - 1]
            if before + self._free_sizes[before] == start:
                start = before
                del self._free_sizes[before]
                del self._free_offsets[index - 1]
                index -= 1
        if index < len(self._free_offsets) and self._free_offsets[index] == end:  # and the one after
            end += self._free_sizes.pop(end)
            del self._free_offsets[index]
        self._insert(start, end - start)

    def _insert(self, offset: int, size: int) -> None:
        bisect.insort(self._free_offsets, offset)
        self._free_sizes[offset] = size

    def view(self, offset: int, nbytes: int) -> memoryview:
        return self._buffer[offset : offset + nbytes]

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def largest_free(self) -> int:
        return max(self._free_sizes.values(), default=0)

    @property
    def page_locked(self) -> bool:
        return self._page_locked_at is not None

    def page_lock(self) -> None:
        """Register the whole pool with CUDA, so a GPU copies into and out of its regions directly
        (and asynchronously) instead of through a pinned bounce buffer. Allocates every page first
        (a mount that cannot hold the pool fails here, cleanly). Raises FailedPreconditionError or
        RuntimeError (CUDA refused: memlock limit, no GPU)."""
        import ctypes

        from epdserve.engine.host_memory import page_lock

        if self.page_locked:
            return
        if not self.preallocated:
            fd = os.open(self.path, os.O_RDWR)
            try:
                _preallocate(fd, self.capacity_bytes)
            finally:
                os.close(fd)
            self.preallocated = True
        anchor = ctypes.c_char.from_buffer(self._map)  # only to read the mapping's address
        address = ctypes.addressof(anchor)
        del anchor
        page_lock(address, self.capacity_bytes, what="the shared-memory cache pool")
        self._page_locked_at = address

    def close(self) -> None:
        """Unlink the file; the mapping goes now, or with the last zero-copy view still alive."""
        if self._page_locked_at is not None:
            from epdserve.engine.host_memory import unpin

            unpin([self._page_locked_at])
            self._page_locked_at = None
        try:
            self._buffer.release()
            self._map.close()
        except BufferError:
            pass
        self.path.unlink(missing_ok=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def held_by_a_live_owner(path: pathlib.Path) -> bool:
    """Whether a running process still owns the pool file at `path` (it holds the file's lock).
    False when the file is gone or its owner's process has ended."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock taken when nobody held it
    return False


def _preallocate(fd: int, capacity: int) -> None:
    from epdserve.errors import FailedPreconditionError

    try:
        os.posix_fallocate(fd, 0, capacity)
    except OSError as exc:
        raise FailedPreconditionError(f"capacity_bytes ({capacity}): the shared-memory mount cannot hold the "
                                      f"preallocated pool ({exc.strerror}); lower --capacity-bytes or give the "
                                      "mount more room") from None


def _check_room(directory: pathlib.Path, capacity: int) -> None:
    """The pool file is sparse: writing past the mount's free space would crash the process (SIGBUS)
    instead of failing cleanly, so refuse a capacity the mount cannot hold."""
    from epdserve.errors import FailedPreconditionError

    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    if free < capacity:
        raise FailedPreconditionError(
            f"capacity_bytes ({capacity}) exceeds the free space of the shared-memory mount ({free} bytes): "
            "lower --capacity-bytes or give the mount more room"
        )


class PoolMappings:
    """Consumer side: one read mapping per owner pool file, dropped when the file is gone or
    replaced (a restarted owner), so a dead owner's memory is not kept alive by its readers. A
    region that cannot be read in place is None (the caller asks the owner's data channel); why is
    logged once per pool file and cause, since every later read of that pool pays the same detour."""

    def __init__(self, max_files: int = 64) -> None:
        self._maps: dict[str, tuple[tuple[int, int], memoryview]] = {}
        self.max_files = max_files
        self._warned: set[tuple[str, str]] = set()

    def region(self, path: str, offset: int, nbytes: int) -> memoryview | None:
        try:
            stat = os.stat(path)
        except OSError as exc:
            self._maps.pop(path, None)
            self._warn(path, "unseen", f"the pool file is not visible here ({exc.strerror})")
            return None
        identity = (stat.st_dev, stat.st_ino)
        cached = self._maps.get(path)
        if cached is None or cached[0] != identity:
            try:
                cached = (identity, self._map(path, stat.st_size))
            except OSError as exc:  # e.g. ENOMEM: a private mapping of the whole pool is refused
                self._warn(path, "unmapped", f"mapping its {stat.st_size} bytes failed ({exc.strerror})")
                return None
            if len(self._maps) >= self.max_files:
                self._maps.pop(next(iter(self._maps)))
            self._maps[path] = cached
        buffer = cached[1]
        if offset < 0 or offset + nbytes > len(buffer):
            self._warn(path, "outside", f"bytes [{offset}, {offset + nbytes}) lie outside its {len(buffer)} "
                                        "mapped bytes")
            return None
        return buffer[offset : offset + nbytes]

    def _warn(self, path: str, kind: str, cause: str) -> None:
        if (path, kind) not in self._warned:
            self._warned.add((path, kind))
            log.warning("cache pool %s cannot be read in place: %s; its entries come over the owner's data "
                        "channel instead", path, cause)

    @staticmethod
    def _map(path: str, size: int) -> memoryview:
        with open(path, "rb") as f:
            # ACCESS_COPY: shared pages for reading, writable for torch.frombuffer, never written back
            return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY))

    def clear(self) -> None:
        self._maps.clear()
