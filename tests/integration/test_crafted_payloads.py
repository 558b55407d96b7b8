"""Crafted payloads against the real mmcache read paths: a data-channel owner that answers with
bad headers or frames, a reader that sends a bad request, and TensorRefs whose header or file does
not add up. Each is a typed rejection (CorruptEntryError / ConnectionError from the data client, a
counted miss from MMCache.get_many): no crash, no huge allocation, no foreign file read."""

from __future__ import annotations

import asyncio
import json
import struct
import tracemalloc

import pytest
import torch

from epdserve.v1 import common_pb2
from mmcache.codec import CorruptEntryError
from mmcache.transfer import MAGIC, NONCE_BYTES, VERSION, DataClient, DataServer

pytestmark = pytest.mark.integration
HEADER = {"dtype": "uint8", "shape": [4], "nbytes": 4, "checksum": "x"}
FRAMES = struct.pack("<II", 0, 4) + b"abcd" + struct.pack("<II", 1, 0)


async def _fetch_from_owner(answer: bytes, *, nbytes: int | None = None):
    """Fetch `img:x` from a fake owner that greets, reads the request, then sends `answer`."""

    async def handle(reader, writer):
        writer.write(MAGIC + bytes([VERSION, 0]) + bytes(NONCE_BYTES))
        await reader.readexactly(5)
        for _ in range(2):
            await reader.readexactly(struct.unpack("<H", await reader.readexactly(2))[0])
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = DataClient(timeout_s=5)
    try:
        return await client.fetch(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", "img:x", nbytes=nbytes)
    finally:
        client.close()
        server.close()
        await server.wait_closed()


def _ok(header: dict | bytes, frames: bytes = FRAMES) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return b"\x00" + struct.pack("<I", len(head)) + head + frames


async def test_a_well_formed_answer_is_read():
    header, data = await _fetch_from_owner(_ok(HEADER), nbytes=4)
    assert header == HEADER and bytes(data) == b"abcd"


@pytest.mark.parametrize("answer,nbytes,error,message", [
    (b"\x00" + struct.pack("<I", 0xFFFFFFFF), None, CorruptEntryError, "header length 4294967295 exceeds"),
    (_ok(b"{not json"), None, CorruptEntryError, "not JSON"),
    (_ok({**HEADER, "dtype": "float128"}), None, CorruptEntryError, "unknown dtype"),
    (_ok({**HEADER, "shape": [-2, -2]}), None, CorruptEntryError, "non-negative"),
    (_ok({**HEADER, "nbytes": 5}), None, CorruptEntryError, "does not match"),
    (_ok({**HEADER, "shape": [1 << 61], "nbytes": 1 << 61}), None, CorruptEntryError, "at most"),
    (_ok({**HEADER, "shape": [1 << 30], "nbytes": 1 << 30}), 4, CorruptEntryError, "the ref 4"),
    (_ok(HEADER, struct.pack("<II", 0, 0xFFFFFFFF)), None, CorruptEntryError, "overflow"),
    (_ok(HEADER, struct.pack("<II", 0, 4) + b"ab"), None, ConnectionError, "closed mid-message"),
    (_ok(HEADER, struct.pack("<II", 0, 4))[:-3], None, ConnectionError, "closed mid-message"),
    (b"\x07", None, CorruptEntryError, "status 7"),
])
async def test_crafted_owner_answers_are_refused_without_allocating(answer, nbytes, error, message):
    tracemalloc.start()
    try:
        with pytest.raises(error, match=message):
            await _fetch_from_owner(answer, nbytes=nbytes)
        assert tracemalloc.get_traced_memory()[1] < 8 << 20  # a 1 GiB or 2 EiB header never became a buffer
    finally:
        tracemalloc.stop()


async def test_a_crafted_request_does_not_take_the_owner_down():
    """Non-UTF-8 key bytes and an oversize length field end that connection; the owner serves on."""
    server = DataServer(lambda key, lease: (HEADER, memoryview(b"abcd"), lambda: None), chunk_bytes=2)
    port = await server.start("127.0.0.1")
    try:
        for request in (MAGIC + bytes([VERSION]) + struct.pack("<H", 2) + b"\xff\xfe" + struct.pack("<H", 0),
                        MAGIC + bytes([VERSION]) + struct.pack("<H", 0xFFFF) + b"img:",  # then hangs up
                        b"EPDX\x09"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readexactly(len(MAGIC) + 2 + NONCE_BYTES)
            writer.write(request)
            await writer.drain()
            writer.write_eof()
            try:
                assert await asyncio.wait_for(reader.read(), 5) == b""
            except ConnectionResetError:
                pass
            writer.close()
        client = DataClient(timeout_s=5)
        header, data = await client.fetch(f"127.0.0.1:{port}", "img:good", nbytes=4)
        assert bytes(data) == b"abcd"
        client.close()
    finally:
        await server.close()


@pytest.fixture
async def cache(open_cache):
    return await open_cache("reader", capacity_bytes=8 << 20)


def _crafted(ref: common_pb2.TensorRef, **fields) -> common_pb2.TensorRef:
    copy = common_pb2.TensorRef()
    copy.CopyFrom(ref)
    for name, value in fields.items():
        if name == "shape":
            del copy.shape[:]
            copy.shape.extend(value)
        else:
            setattr(copy, name, value)
    return copy


async def test_crafted_refs_are_counted_misses_before_anything_is_read(cache, tmp_path, monkeypatch):
    import mmcache.client

    ref = await cache.put("img:real", torch.ones(2, 3), ttl_s=60)
    foreign = tmp_path / "secret.txt"
    foreign.write_bytes(b"x" * 24)
    opened: list[str] = []  # every file the reader maps or reads for a ref
    read_file, region = mmcache.client._read_file, cache.mappings.region
    monkeypatch.setattr(mmcache.client, "_read_file", lambda path, n: opened.append(path) or read_file(path, n))
    monkeypatch.setattr(cache.mappings, "region", lambda path, *a: opened.append(path) or region(path, *a))
    other = dict(owner="other-owner", host=cache.owner.host_id, data_address="")
    crafted = [
        _crafted(ref, dtype=99),                                            # unknown dtype code
        _crafted(ref, shape=[-2, -3]),                                      # negative dims, product 6
        _crafted(ref, shape=[1 << 40, 1 << 40], nbytes=(1 << 62)),          # huge
        _crafted(ref, nbytes=25),                                           # shape * itemsize != nbytes
        _crafted(ref, shape=[1] * 9),                             # too many dims
        _crafted(ref, offset=-8),
        _crafted(ref, tier="disk", path=str(foreign), **other),             # files that are not cache files
        _crafted(ref, tier="host", path=str(foreign), **other),
        _crafted(ref, tier="disk", path=f"{tmp_path}/disk-other-owner/../secret.txt", **other),
        _crafted(ref, tier="host", path="/dev/shm/pool-../../x.shm", owner="../../x", host=cache.owner.host_id),
    ]
    before = cache.metrics.value("corrupt")
    tracemalloc.start()
    try:
        assert await cache.get_many(crafted) == [None] * len(crafted)
        assert tracemalloc.get_traced_memory()[1] < 8 << 20
    finally:
        tracemalloc.stop()
    assert opened == []
    assert cache.metrics.value("corrupt") - before == len(crafted)
    assert await cache.get_many([_crafted(ref, checksum="xxh3_64:0000")]) == [None]  # wrong checksum
    assert cache.metrics.value("corrupt") - before == len(crafted) + 1
    assert torch.equal((await cache.get_many([ref]))[0], torch.ones(2, 3))  # and the cache still serves
