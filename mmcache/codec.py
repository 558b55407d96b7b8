"""Tensors as raw bytes: the dtype table, zero-copy views, xxh3-64 checksums. No pickle."""

from __future__ import annotations

import math

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
    if dtype not in _DTYPES:
        raise CorruptEntryError(f"unknown dtype {dtype!r}")
    return math.prod(shape) * _DTYPES[dtype][0].itemsize


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
