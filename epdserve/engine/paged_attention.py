"""Decode attention over a paged KV cache (one new query per sequence) and the one-row KV write.

Invariant: sequence b attends exactly rows [max(0, seq_lens[b] - window), seq_lens[b]) of its
blocks `block_tables[b]` (row r at block r // block_size, offset r % block_size); nothing else
is read into the result, and a sequence with seq_lens 0 (padding) gets zeros.

Two backends compute the same thing: a vectorised torch reference (CPU, any shape) and a Triton
split-K kernel (`epdserve.kernels.paged_decode`, CUDA; imported only when first used).
"""

from __future__ import annotations

import functools
import types

import torch

from epdserve.models.layers import deterministic_sdpa

BACKENDS = ("auto", "torch", "triton")


def write_decode_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    slot_blocks: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    """Store one row per sequence: k_new / v_new [B, H_kv, D] at (slot_blocks[b], slot_offsets[b])
    (int32 or int64 [B]); mutates the caches in place. Tensor indexing only (no host sync:
    CUDA-graph safe). Rows of one call must be distinct slots (else the last write is arbitrary)."""
    blocks, offsets = slot_blocks.long(), slot_offsets.long()
    k_cache[blocks, :, offsets] = k_new.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v_new.to(v_cache.dtype)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float | None = None,
                           window: int | None = None, backend: str = "auto") -> torch.Tensor:
    """q [B, H, D] (RoPE applied); caches [num_blocks, H_kv, block_size, D]; block_tables int32
    [B, W] (entries past a sequence's blocks are never read); seq_lens int32/int64 [B] (0: padding,
    gives zeros). Returns a new [B, H, D] tensor in q's dtype. GQA: query head h reads KV head
    h // (H / H_kv). `scale` defaults to D ** -0.5; `window` (>= 1) keeps the last `window` rows.

    backend: "torch" (reference), "triton" (kernel; raises if triton is missing or the shape is
    unsupported: head_dim > 256 or a dtype other than fp16/bf16/fp32), "auto" (the kernel for CUDA
    tensors when triton imports and the shape is supported, else the reference; never the kernel
    on CPU). Neither backend syncs with the host or sizes anything from tensor values."""
    _check_arguments(q, k_cache, v_cache, window, backend)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kernels = _chosen_kernels(q, k_cache, backend)
    if kernels is not None:
        return kernels.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, window)
    return reference_paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=scale, window=window)


def reference_paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, seq_lens: torch.Tensor, *,
                                     scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """The torch reference: gather every sequence's W blocks ([B, H_kv, W * block_size, D]), mask
    rows outside [lo, seq_len) (their contents never reach the result, even NaN), softmax
    attention in float32; result in q's dtype. Sizes come from shapes only (the whole table width
    is gathered), so it is graph-capturable too."""
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    allowed = _row_mask(seq_lens, block_tables.shape[1] * k_cache.shape[2], window)  # [B, rows]
    keys, values = _gather_rows(k_cache, block_tables, allowed), _gather_rows(v_cache, block_tables, allowed)
    out = deterministic_sdpa(q.float()[:, :, None], keys, values, attn_mask=allowed[:, None, None], scale=scale,
                             enable_gqa=heads != kv_heads)[:, :, 0]
    empty = ~allowed.any(dim=1)[:, None, None]  # a fully masked row is NaN in SDPA: padding gets zeros
    return out.masked_fill(empty, 0.0).to(q.dtype)


def _gather_rows(cache: torch.Tensor, block_tables: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """[num_blocks, H_kv, bs, D] gathered by [B, W] block ids -> float32 [B, H_kv, W * bs, D], with
    rows outside `allowed` [B, W * bs] zeroed (unread rows may hold anything, NaN included)."""
    batch, width = block_tables.shape
    _, kv_heads, block_size, dim = cache.shape
    blocks = cache[block_tables.long()]  # [B, W, H_kv, bs, D]: a fresh copy
    rows = blocks.transpose(1, 2).reshape(batch, kv_heads, width * block_size, dim).float()
    return rows.masked_fill_(~allowed[:, None, :, None], 0.0)


def _row_mask(seq_lens: torch.Tensor, rows: int, window: int | None) -> torch.Tensor:
    """bool [B, rows]: row r of sequence b is attended iff max(0, len_b - window) <= r < len_b."""
    positions = torch.arange(rows, device=seq_lens.device)[None]
    lengths = seq_lens.long()[:, None]
    allowed = positions < lengths
    if window is not None:
        allowed &= positions >= lengths - window
    return allowed


def _check_arguments(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None,
                     backend: str) -> None:
    """Shape and option checks (host-side metadata only; no device sync)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache {tuple(k_cache.shape)}/{k_cache.dtype} and v_cache "
                         f"{tuple(v_cache.shape)}/{v_cache.dtype} differ")
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)} "
                         "([B, H, D] with H a multiple of H_kv)")


def _chosen_kernels(q: torch.Tensor, k_cache: torch.Tensor, backend: str) -> types.ModuleType | None:
    """The kernel module when this call runs the Triton kernel, None for the reference. Raises when
    backend="triton" cannot be honoured."""
    if backend == "torch" or (backend == "auto" and not q.is_cuda):
        return None
    kernels = _kernel_module()
    if kernels is None:
        if backend == "triton":
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        return None
    if not kernels.supports(q, k_cache):
        if backend == "triton":
            raise ValueError(f"the Triton kernel does not support head_dim {q.shape[-1]} with {k_cache.dtype}")
        return None
    return kernels


@functools.lru_cache(maxsize=1)
def _kernel_module() -> types.ModuleType | None:
    """`epdserve.kernels.paged_decode`, or None when triton is not installed."""
    try:
        from epdserve.kernels import paged_decode
    except ImportError:
        return None
    return paged_decode
