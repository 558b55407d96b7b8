"""Tensors as raw bytes: the dtype table, zero-copy views, xxh3-64 checksums. No pickle.

Every header that arrives from elsewhere (a TensorRef, an index entry, a data-channel header) is
checked with `check_layout` / `parse_header` before a byte is read or allocated: a known dtype, at
most MAX_DIMS non-negative dimensions, and nbytes equal to prod(shape) * itemsize and at most
MAX_ENTRY_BYTES; anything else is a CorruptEntryError.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
import xxhash

from epdserve.v1 import common_pb2

_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, common_pb2.DTYPE_FLOAT32),
    "float16": (torch.float16, common_pb2.DTYPE_FLOAT16),
    "bfloat16": (torch.bfloat16, common_pb2.DTYPE_BFLOAT16),
    "int64": (torch.int64, common_pb2.DTYPE_INT64),
    "int32": (torch.int32, common_pb2.DTYPE_INT32),
    "uint8": (torch.uint8, common_pb2.DTYPE_UINT8),
}
MAX_DIMS = 8
MAX_ENTRY_BYTES = 1 << 40   # a sanity bound on one entry's size, far above any real tensor
MAX_HEADER_BYTES = 64 << 10  # a serialized header (JSON) is a few hundred bytes
_BY_TORCH = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}
_BY_PROTO = {proto: name for name, (_, proto) in _DTYPES.items()}


class CorruptEntryError(ValueError):
    """Bytes or header of a cache entry do not add up (size, dtype, checksum, chunk offsets)."""


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _BY_TORCH:
        raise ValueError(f"dtype {dtype} cannot be cached (supported: {sorted(_DTYPES)})")
    return _BY_TORCH[dtype]


def proto_dtype(name: str) -> int:
    return _DTYPES[name][1]


def name_of_proto_dtype(value: int) -> str:
    if value not in _BY_PROTO:
        raise CorruptEntryError(f"unknown dtype code {value}")
    return _BY_PROTO[value]


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of `dtype` and `shape`; CorruptEntryError for an unknown dtype, too many
    or negative dimensions, or a size past MAX_ENTRY_BYTES."""
    if dtype not in _DTYPES:
        raise CorruptEntryError(f"unknown dtype {str(dtype)[:40]!r}")
    if len(shape) > MAX_DIMS:
        raise CorruptEntryError(f"shape has {len(shape)} dimensions (at most {MAX_DIMS})")
    if any(type(d) is not int or d < 0 for d in shape):
        raise CorruptEntryError(f"shape {tuple(shape)[:MAX_DIMS]} must be non-negative integers")
    nbytes = math.prod(shape) * _DTYPES[dtype][0].itemsize
    if nbytes > MAX_ENTRY_BYTES:
        raise CorruptEntryError(f"shape {tuple(shape)} needs {nbytes} bytes (at most {MAX_ENTRY_BYTES})")
    return nbytes


def check_layout(dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
    """CorruptEntryError unless `nbytes` is exactly what `dtype` and `shape` need (see nbytes_of)."""
    expected = nbytes_of(dtype, shape)
    if nbytes != expected:
        raise CorruptEntryError(f"nbytes {nbytes} does not match dtype {dtype} shape {tuple(shape)} ({expected})")


def parse_header(raw: bytes | str) -> dict[str, Any]:
    """A data-channel entry header (JSON {dtype, shape, nbytes, checksum}), strictly checked:
    returns {"dtype": str, "shape": list[int], "nbytes": int, "checksum": str}."""
    if len(raw) > MAX_HEADER_BYTES:
        raise CorruptEntryError(f"entry header of {len(raw)} bytes (at most {MAX_HEADER_BYTES})")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CorruptEntryError(f"entry header is not JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise CorruptEntryError("entry header is not a JSON object")
    dtype, shape, nbytes, digest = (obj.get(k) for k in ("dtype", "shape", "nbytes", "checksum"))
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(digest, str):
        raise CorruptEntryError("entry header needs dtype (string), shape (list) and checksum (string)")
    if type(nbytes) is not int:
        raise CorruptEntryError("entry header's nbytes must be an integer")
    check_layout(dtype, tuple(shape), nbytes)
    return {"dtype": dtype, "shape": list(shape), "nbytes": nbytes, "checksum": digest}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor (moved to CPU, made contiguous); any dtype, bf16 included."""
    t = tensor.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def tensor_from_buffer(buf, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor viewing `buf` (zero-copy; `buf` must be writable and outlive the tensor, which keeps
    a reference to it). Raises CorruptEntryError if the size does not match."""
    expected = nbytes_of(dtype, shape)
    if len(buf) != expected:
        raise CorruptEntryError(f"entry has {len(buf)} bytes, dtype {dtype} shape {shape} needs {expected}")
    torch_dtype = _DTYPES[dtype][0]
    if expected == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(torch_dtype).reshape(shape)


def checksum(buf) -> str:
    """Integrity check of entry bytes (not a security boundary: keys are SHA-256, and values
    are never deserialised beyond raw bytes). xxh3-64 runs at memory speed."""
    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(buf)


def verify(buf, expected: str) -> None:
    actual = checksum(buf)
    if actual != expected:
        raise CorruptEntryError(f"checksum mismatch ({actual} != {expected})")
