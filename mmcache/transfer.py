"""Moving bytes between hosts, and the owner's control service.

Data channel (chosen by measurement over gRPC streaming: ~3.5 GB/s against ~0.5 GB/s on the
2-core CI machine): a framed TCP stream served by the owner's event loop, zero-copy from the
owner's memory into the socket. Protocol v1, all integers little-endian:
  request  : b"EPDX" u8 version u16 len key u16 len lease_id
  response : u8 status (0 ok, 1 not found, 2 bad request)
             [ok] u32 len header-json {dtype, shape, nbytes, checksum}
                  frames: u32 seq u32 len payload ... then a frame with len 0
Sequence numbers start at 0 and grow by one; a gap, reorder, overflow or early end is a
CorruptEntryError. The connection stays open for further requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from epdserve.errors import InvalidArgumentError
from epdserve.v1 import cache_pb2, cache_pb2_grpc
from mmcache.codec import CorruptEntryError
from mmcache.keys import validate_key

if TYPE_CHECKING:
    from mmcache.client import MMCache

log = logging.getLogger(__name__)
MAGIC, VERSION = b"EPDX", 1
OK, NOT_FOUND, BAD_REQUEST = 0, 1, 2
_FRAME = struct.Struct("<II")
_SOCKET_BUFFER = 4 << 20


class DataServer:
    """Serves entry bytes of one owner. `acquire(key, lease_id)` returns (header, view, release)
    or None; the view stays valid until `release()` (the acquire holds a lease)."""

    def __init__(self, acquire: Callable, chunk_bytes: int) -> None:
        self.acquire, self.chunk_bytes = acquire, chunk_bytes
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port = 0

    async def start(self, host: str) -> int:
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(64)
        listener.setblocking(False)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._spawn(self._accept_loop())
        return self.port

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            conn.setblocking(False)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            self._spawn(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                request = await _read_request(loop, conn)
                if request is None:
                    return
                await self._answer(loop, conn, *request)
        except (ConnectionError, OSError, CorruptEntryError, asyncio.IncompleteReadError) as exc:
            log.debug("data connection closed: %s", exc)
        finally:
            conn.close()

    async def _answer(self, loop, conn, key: str, lease_id: str) -> None:
        try:
            validate_key(key)
        except InvalidArgumentError:
            await loop.sock_sendall(conn, bytes([BAD_REQUEST]))
            return
        found = self.acquire(key, lease_id)
        if found is None:
            await loop.sock_sendall(conn, bytes([NOT_FOUND]))
            return
        header, view, release = found
        try:
            head = json.dumps(header).encode()
            await loop.sock_sendall(conn, bytes([OK]) + struct.pack("<I", len(head)) + head)
            seq = 0
            for start in range(0, len(view), self.chunk_bytes):
                chunk = view[start : start + self.chunk_bytes]
                await loop.sock_sendall(conn, _FRAME.pack(seq, len(chunk)))
                await loop.sock_sendall(conn, chunk)
                seq += 1
            await loop.sock_sendall(conn, _FRAME.pack(seq, 0))
        finally:
            release()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _read_request(loop, conn) -> tuple[str, str] | None:
    magic = await _recv_exact(loop, conn, 5, eof_ok=True)
    if magic is None:
        return None
    if magic[:4] != MAGIC or magic[4] != VERSION:
        raise CorruptEntryError("not an epdserve data-channel request")
    key = (await _recv_exact(loop, conn, struct.unpack("<H", await _recv_exact(loop, conn, 2))[0])).decode()
    lease = (await _recv_exact(loop, conn, struct.unpack("<H", await _recv_exact(loop, conn, 2))[0])).decode()
    return key, lease


async def _recv_exact(loop, conn, n: int, *, eof_ok: bool = False, into: memoryview | None = None):
    buf = into if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        count = await loop.sock_recv_into(conn, buf[got:n])
        if count == 0:
            if eof_ok and got == 0:
                return None
            raise ConnectionError("connection closed mid-message")
        got += count
    return buf.obj if into is None else buf


class DataClient:
    """Fetches entries from owners' data channels, keeping idle connections per address."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._idle: dict[str, list[socket.socket]] = {}

    async def fetch(self, address: str, key: str, lease_id: str = "") -> tuple[dict, bytearray] | None:
        """(header, bytes) of an entry, or None if the owner does not hold it. Raises
        CorruptEntryError on a framing error, OSError / TimeoutError when the owner is unreachable."""
        conn = self._idle.get(address, []).pop() if self._idle.get(address) else await self._connect(address)
        try:
            result = await asyncio.wait_for(self._exchange(conn, key, lease_id), self.timeout_s)
        except BaseException:
            conn.close()
            raise
        self._idle.setdefault(address, []).append(conn)
        return result

    async def _connect(self, address: str) -> socket.socket:
        host, port = address.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        conn = socket.socket(family)
        conn.setblocking(False)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        try:
            await asyncio.wait_for(loop.sock_connect(conn, (host.strip("[]"), int(port))), self.timeout_s)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _exchange(self, conn, key: str, lease_id: str) -> tuple[dict, bytearray] | None:
        loop = asyncio.get_running_loop()
        k, lease = key.encode(), lease_id.encode()
        await loop.sock_sendall(conn, MAGIC + bytes([VERSION]) + struct.pack("<H", len(k)) + k
                                + struct.pack("<H", len(lease)) + lease)
        status = (await _recv_exact(loop, conn, 1))[0]
        if status == NOT_FOUND:
            return None
        if status != OK:
            raise CorruptEntryError(f"data channel refused the request (status {status})")
        size = struct.unpack("<I", await _recv_exact(loop, conn, 4))[0]
        header = json.loads(bytes(await _recv_exact(loop, conn, size)))
        return header, await _read_frames(loop, conn, int(header["nbytes"]))

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


async def _read_frames(loop, conn, nbytes: int) -> bytearray:
    data = bytearray(nbytes)
    view, filled, expected_seq = memoryview(data), 0, 0
    while True:
        seq, length = _FRAME.unpack(await _recv_exact(loop, conn, _FRAME.size))
        if seq != expected_seq:
            raise CorruptEntryError(f"frame {seq} arrived where frame {expected_seq} was expected")
        if length == 0:
            break
        if filled + length > nbytes:
            raise CorruptEntryError(f"frames overflow the entry ({filled + length} > {nbytes} bytes)")
        await _recv_exact(loop, conn, length, into=view[filled : filled + length])
        filled += length
        expected_seq += 1
    if filled != nbytes:
        raise CorruptEntryError(f"stream ended after {filled} of {nbytes} bytes")
    return data


class CacheControlServicer(cache_pb2_grpc.CacheControlServicer):
    """Lease and Release for the entries this owner holds."""

    def __init__(self, cache: "MMCache") -> None:
        self.cache = cache

    async def Lease(self, request: cache_pb2.LeaseRequest, context) -> cache_pb2.LeaseResponse:
        if not 0 < request.lease_s <= 3600:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "lease_s must be in (0, 3600]")
        ids = [self.cache.lease_local(k, request.lease_s) if _valid(k) else "" for k in request.keys]
        return cache_pb2.LeaseResponse(lease_ids=ids)

    async def Release(self, request: cache_pb2.ReleaseRequest, context) -> cache_pb2.ReleaseResponse:
        pairs = [(r.key, r.lease_id) for r in request.leases if _valid(r.key)]
        return cache_pb2.ReleaseResponse(released=await self.cache.release_local(pairs))


    async def Stats(self, request, context) -> cache_pb2.StatsResponse:
        return self.cache.stats()


def _valid(key: str) -> bool:
    try:
        validate_key(key)
        return True
    except InvalidArgumentError:
        return False
