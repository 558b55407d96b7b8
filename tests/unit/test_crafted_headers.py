"""Crafted cache headers: every header that arrives from elsewhere (a data-channel entry header, a
Redis index entry, a dtype / shape pair for a buffer) is checked strictly before a byte is read or
allocated, and a bad one is a CorruptEntryError naming what is wrong: never another exception,
never a huge allocation."""

from __future__ import annotations

import json
import tracemalloc

import pytest
import torch

from mmcache.codec import (
    MAX_HEADER_BYTES,
    CorruptEntryError,
    check_layout,
    parse_header,
    tensor_bytes,
    tensor_from_buffer,
)
from mmcache.index import IndexEntry

pytestmark = pytest.mark.unit

GOOD = {"dtype": "float32", "shape": [2, 3], "nbytes": 24, "checksum": "xxh3_64:00"}


def _header(**fields) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


def test_a_good_header_parses():
    assert parse_header(_header()) == GOOD
    assert parse_header(_header(dtype="bfloat16", shape=[0, 7], nbytes=0))["shape"] == [0, 7]


@pytest.mark.parametrize("raw,message", [
    (_header(dtype="complex128"), "unknown dtype 'complex128'"),
    (_header(dtype="object"), "unknown dtype"),
    (_header(shape=[-2, -3]), "must be non-negative"),              # product 6 == 24 / 4: still refused
    (_header(shape=[2, 3.0]), "must be non-negative integers"),
    (_header(shape=[True, 24]), "must be non-negative integers"),
    (_header(shape=[1 << 40, 1 << 40], nbytes=1 << 82), "at most 1099511627776"),
    (_header(shape=[1] * 9, nbytes=4), "9 dimensions"),
    (_header(nbytes=25), "nbytes 25 does not match dtype float32 shape (2, 3) (24)"),
    (_header(nbytes=-24), "does not match"),
    (_header(nbytes="24"), "nbytes must be an integer"),
    (_header(nbytes=24.0), "nbytes must be an integer"),
    (_header(checksum=None), "needs dtype"),
    (_header(shape="23"), "needs dtype"),
    (b"{not json", "not JSON"),
    (b"\x80\x81{}", "not JSON"),
    (b"[" * 20_000, "not JSON"),                                         # deep nesting: RecursionError inside
    (b"[1, 2]", "not a JSON object"),
    (b"x" * (MAX_HEADER_BYTES + 1), f"at most {MAX_HEADER_BYTES}"),
])
def test_crafted_data_channel_headers_are_refused(raw, message):
    with pytest.raises(CorruptEntryError) as info:
        parse_header(raw)
    assert message in str(info.value)


@pytest.mark.parametrize("dtype,shape,size,message", [
    ("float32", (-1, -4), 16, "non-negative"),          # product 4: reshape would have raised RuntimeError
    ("int4", (4,), 2, "unknown dtype"),
    ("float32", (3,), 16, "needs 12"),
    ("uint8", (1,) * 9, 1, "9 dimensions"),
])
def test_buffers_with_crafted_layouts_are_refused(dtype, shape, size, message):
    with pytest.raises(CorruptEntryError, match=message):
        tensor_from_buffer(bytearray(size), dtype, shape)


def test_a_huge_shape_is_refused_without_allocating():
    tracemalloc.start()
    try:
        with pytest.raises(CorruptEntryError):
            check_layout("float32", (1 << 31, 1 << 31), 1 << 64)
        with pytest.raises(CorruptEntryError):
            parse_header(_header(shape=[1 << 62], nbytes=1 << 64))
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_the_round_trip_still_holds():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert torch.equal(tensor_from_buffer(bytearray(tensor_bytes(t)), "float32", (2, 3)), t)


INDEX_GOOD = {"v": 1, "o": "owner", "h": "host", "c": "127.0.0.1:1", "x": "127.0.0.1:2", "t": "host",
              "p": "/dev/shm/x/pool-owner.shm", "f": 0, "d": "float32", "s": [2, 3], "n": 24, "k": "xxh3_64:00",
              "a": 0.0}


@pytest.mark.parametrize("fields,message", [
    ({"d": "complex64"}, "unknown dtype"),
    ({"s": [-2, -3]}, "non-negative"),
    ({"n": 1 << 40}, "does not match"),
    ({"s": [1 << 40, 1 << 40], "n": 1 << 82}, "at most"),
    ({"s": [float("inf")]}, "OverflowError"),
    ({"s": ["x"]}, "ValueError"),
    ({"d": ["float32"]}, "TypeError"),
    ({"o": None, "n": None}, "TypeError"),
])
def test_crafted_index_entries_are_refused(fields, message):
    text = json.dumps({**INDEX_GOOD, **fields})
    with pytest.raises(CorruptEntryError, match=message):
        IndexEntry.from_json("img:k", text)


@pytest.mark.parametrize("text", [b"[" * 100_000, b"\xff", b"null", b'"s"', b"{}"])
def test_garbage_index_entries_are_refused(text):
    with pytest.raises(CorruptEntryError, match="malformed index entry for img:k"):
        IndexEntry.from_json("img:k", text)


def test_a_good_index_entry_parses():
    entry = IndexEntry.from_json("img:k", json.dumps(INDEX_GOOD))
    assert entry.shape == (2, 3) and entry.nbytes == 24 and entry.dtype == "float32"
