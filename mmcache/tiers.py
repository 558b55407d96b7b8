"""Storage tiers of one owner: GPU (device tensors, owner-local), host shared-memory pool, disk.

Each tier only stores and frees bytes; the TieredStore decides what lives where (LRU, leases,
demotion, promotion). `Location` says where an entry's bytes are, for consumers on this host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import tempfile

import torch

from mmcache.codec import tensor_bytes
from mmcache.pool import SharedMemoryPool


@dataclasses.dataclass(frozen=True)
class Location:
    tier: str           # "device" | "host" | "disk"
    path: str = ""      # pool file (host) or entry file (disk); "" for device
    offset: int = 0     # region offset inside the pool file


class DeviceTier:
    """Tensors kept on the owner's accelerator; only the owner reads them in place."""

    name = "device"

    def __init__(self, device: str, capacity_bytes: int) -> None:
        self.device = torch.device(device)
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0

    def fits(self, nbytes: int) -> bool:
        return self.used_bytes + nbytes <= self.capacity_bytes

    def store(self, key: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """Keeps `tensor` (moved to the device); the store owns it from now on."""
        nbytes = tensor.numel() * tensor.element_size()
        if not self.fits(nbytes):
            return None
        self.used_bytes += nbytes
        return tensor.detach().to(self.device)

    def host_bytes(self, handle: torch.Tensor, nbytes: int) -> memoryview:
        return tensor_bytes(handle)

    def free(self, handle: torch.Tensor, nbytes: int) -> None:
        self.used_bytes -= nbytes

    def location(self, handle) -> Location:
        return Location("device")

    def close(self) -> None:
        self.used_bytes = 0


class HostTier:
    """Regions of the shared-memory pool; same-host consumers map the pool file and read in place."""

    name = "host"

    def __init__(self, pool: SharedMemoryPool) -> None:
        self.pool = pool

    @property
    def capacity_bytes(self) -> int:
        return self.pool.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.pool.used_bytes

    def store(self, key: str, data: memoryview) -> int | None:
        offset = self.pool.allocate(len(data))
        if offset is not None and len(data):
            self.pool.view(offset, len(data))[:] = data
        return offset

    def host_bytes(self, offset: int, nbytes: int) -> memoryview:
        return self.pool.view(offset, nbytes)

    def free(self, offset: int, nbytes: int) -> None:
        self.pool.free(offset, nbytes)

    def location(self, offset: int) -> Location:
        return Location("host", str(self.pool.path), offset)

    def close(self) -> None:
        self.pool.close()


class DiskTier:
    """One file per entry (raw bytes) in a spill directory, written atomically."""

    name = "disk"

    def __init__(self, directory: pathlib.Path, capacity_bytes: int) -> None:
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0

    def fits(self, nbytes: int) -> bool:
        return self.used_bytes + nbytes <= self.capacity_bytes

    def store(self, key: str, data: memoryview) -> pathlib.Path | None:
        if not self.fits(len(data)):
            return None
        path = self.directory / hashlib.sha256(key.encode()).hexdigest()[:40]
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        self.used_bytes += len(data)
        return path

    def host_bytes(self, path: pathlib.Path, nbytes: int) -> memoryview:
        data = bytearray(nbytes)
        with open(path, "rb") as f:
            f.readinto(data)
        return memoryview(data)

    def free(self, path: pathlib.Path, nbytes: int) -> None:
        self.used_bytes -= nbytes
        path.unlink(missing_ok=True)

    def location(self, path: pathlib.Path) -> Location:
        return Location("disk", str(path))

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self.used_bytes = 0
