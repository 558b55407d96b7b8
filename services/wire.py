"""Proto <-> typed values at the service boundary (validated: nothing is trusted because it came
from another epdserve stage)."""

from __future__ import annotations

import dataclasses

import torch

from epdserve.engine.sampler import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, SamplingParams, validate_sampling
from epdserve.errors import InvalidArgumentError
from epdserve.v1 import common_pb2
from mmcache.codec import CorruptEntryError, check_layout, name_of_proto_dtype
from services.prefill.fastkv import FastKVConfig


def sampling_from_proto(msg: common_pb2.SamplingParams, *, field: str = "sampling") -> SamplingParams:
    temperature = msg.temperature if msg.HasField("temperature") else DEFAULT_TEMPERATURE
    top_k = msg.top_k if msg.HasField("top_k") else DEFAULT_TOP_K
    top_p = msg.top_p if msg.HasField("top_p") else DEFAULT_TOP_P
    seed = msg.seed if msg.HasField("seed") else 0
    validate_sampling(temperature, top_k, top_p, seed, field_prefix=f"{field}.")
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed
    )


def check_finite(tensor: torch.Tensor, field: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InvalidArgumentError(f"{field}: contains NaN or Inf")


FLOAT_DTYPES = (common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_FLOAT16, common_pb2.DTYPE_BFLOAT16)


def check_embedding_ref(ref: common_pb2.TensorRef, field: str, *, hidden_size: int, max_rows: int) -> None:
    """An image-embedding ref's header, before any byte is read: a float [rows, hidden_size] tensor
    with 1 <= rows <= max_rows whose nbytes match (so what the read allocates is bounded)."""
    shape = tuple(ref.shape)
    if ref.dtype not in FLOAT_DTYPES or len(shape) != 2 or shape[1] != hidden_size:
        raise InvalidArgumentError(f"{field}: expected a float [tokens, {hidden_size}] tensor "
                                   f"(got dtype code {ref.dtype}, shape {shape[:8]})")
    if not 1 <= shape[0] <= max_rows:
        raise InvalidArgumentError(f"{field}: {shape[0]} rows (must be in [1, {max_rows}])")
    try:
        check_layout(name_of_proto_dtype(ref.dtype), shape, ref.nbytes)
    except CorruptEntryError as exc:
        raise InvalidArgumentError(f"{field}: {exc}") from None


def fastkv_from_proto(parent, default: FastKVConfig | None, *, base: FastKVConfig | None = None,
                      field: str = "fastkv") -> FastKVConfig | None:
    """The FastKV settings a request asks for: `parent.fastkv` when set (enabled=false turns it
    off), else the deployment's default (None = lossless). Zero fields take the default's values,
    or `base`'s (the deployment's settings while FastKV is off by default: its TSP layer, rates)."""
    if not parent.HasField("fastkv"):
        return default
    msg = parent.fastkv
    if not msg.enabled:
        return None
    base = default or base or FastKVConfig()
    try:
        return dataclasses.replace(
            base, tsp_rate=msg.tsp_rate or base.tsp_rate, retain_rate=msg.retain_rate or base.retain_rate,
            tsp_length=msg.tsp_length or base.tsp_length, kv_budget=msg.kv_budget or base.kv_budget)
    except ValueError as exc:
        raise InvalidArgumentError(f"{field}: {exc}") from None


def fastkv_to_proto(config: FastKVConfig | None) -> common_pb2.FastKVSettings:
    if config is None:
        return common_pb2.FastKVSettings(enabled=False)
    return common_pb2.FastKVSettings(enabled=True, tsp_rate=config.tsp_rate, retain_rate=config.retain_rate,
                                     tsp_length=config.tsp_length, kv_budget=config.kv_budget)
