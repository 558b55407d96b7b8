"""Moving entry bytes between hosts over gRPC: the owner's CacheTransfer servicer (chunked Fetch,
Release) and the consumer's fetch client."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from epdserve.errors import InvalidArgumentError
from epdserve.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from mmcache.codec import CorruptEntryError, proto_dtype
from mmcache.keys import validate_key

if TYPE_CHECKING:
    from mmcache.client import MMCache


class CacheTransferServicer(cache_pb2_grpc.CacheTransferServicer):
    def __init__(self, cache: "MMCache", chunk_bytes: int) -> None:
        self.cache = cache
        self.chunk_bytes = chunk_bytes

    async def Fetch(self, request: cache_pb2.FetchRequest, context: grpc.aio.ServicerContext):
        try:
            key = validate_key(request.key)
        except InvalidArgumentError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        entry = self.cache.store.get(key)
        data = self.cache.store.open_read(key) if entry is not None else None
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{key} is not held by this owner")
        meta = entry.meta
        header = common_pb2.TensorRef(key=key, dtype=proto_dtype(meta["dtype"]), shape=meta["shape"],
                                      nbytes=entry.nbytes, checksum=meta["checksum"])
        if entry.nbytes == 0:
            yield cache_pb2.FetchChunk(header=header, offset=0, data=b"")
            return
        for offset in range(0, entry.nbytes, self.chunk_bytes):
            chunk = cache_pb2.FetchChunk(offset=offset, data=bytes(data[offset : offset + self.chunk_bytes]))
            if offset == 0:
                chunk.header.CopyFrom(header)
            yield chunk

    async def Release(self, request: cache_pb2.ReleaseRequest, context) -> cache_pb2.ReleaseResponse:
        keys = [k for k in request.keys if _valid(k)]
        return cache_pb2.ReleaseResponse(released=await self.cache.free_owned(keys))


def _valid(key: str) -> bool:
    try:
        validate_key(key)
        return True
    except InvalidArgumentError:
        return False


async def fetch_remote(stub: cache_pb2_grpc.CacheTransferStub, key: str, *, timeout_s: float
                       ) -> tuple[common_pb2.TensorRef, bytearray]:
    """Pull one entry from its owner; chunks must arrive in order with no gap or overflow."""
    header: common_pb2.TensorRef | None = None
    data = bytearray()
    async for chunk in stub.Fetch(cache_pb2.FetchRequest(key=key), timeout=timeout_s):
        if header is None:
            if not chunk.HasField("header"):
                raise CorruptEntryError("first chunk carries no header")
            header = chunk.header
            data = bytearray(header.nbytes)
            filled = 0
        if chunk.offset != filled or filled + len(chunk.data) > len(data):
            raise CorruptEntryError(f"chunk at offset {chunk.offset} does not follow byte {filled}")
        data[filled : filled + len(chunk.data)] = chunk.data
        filled += len(chunk.data)
    if header is None or filled != len(data):
        raise CorruptEntryError("stream ended before the whole entry arrived")
    return header, data
