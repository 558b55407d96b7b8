"""Decode attention over a paged KV cache (one new query per sequence) and the one-row KV write.

Invariant: sequence b attends exactly rows [max(0, seq_lens[b] - window), seq_lens[b]) of its
blocks `block_tables[b]` (row r at block r // block_size, offset r % block_size); nothing else
is read into the result, and a sequence with seq_lens 0 (padding) gets zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_decode_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    slot_blocks: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    """Store one row per sequence: k_new / v_new [B, H_kv, D] at (slot_blocks[b], slot_offsets[b]).
    Tensor indexing only (no host sync: CUDA-graph safe)."""
    blocks, offsets = slot_blocks.long(), slot_offsets.long()
    k_cache[blocks, :, offsets] = k_new.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v_new.to(v_cache.dtype)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float | None = None,
                           window: int | None = None, backend: str = "auto") -> torch.Tensor:
    """q [B, H, D] (RoPE applied); caches [num_blocks, H_kv, block_size, D]; block_tables int32
    [B, nb]; seq_lens int32 [B]. Returns [B, H, D] in q's dtype. GQA: query head h reads KV head
    h // (H / H_kv)."""
    return reference_paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=scale, window=window)


def reference_paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, *, scale=None, window=None):
    """Gather each sequence's blocks, mask by length (and window), SDPA. Shapes only decide sizes."""
    batch, heads, dim = q.shape
    width, block_size, kv_heads = block_tables.shape[1], k_cache.shape[2], k_cache.shape[1]
    ids = block_tables.long()
    keys = k_cache[ids].transpose(1, 2).reshape(batch, kv_heads, width * block_size, dim)
    values = v_cache[ids].transpose(1, 2).reshape(batch, kv_heads, width * block_size, dim)
    rows = torch.arange(width * block_size, device=q.device)[None]
    lengths = seq_lens.long()[:, None]
    allowed = rows < lengths
    if window is not None:
        allowed &= rows >= lengths - window
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=allowed[:, None, None],
                                         scale=scale, enable_gqa=heads != kv_heads)[:, :, 0]
    return torch.where(lengths[:, :, None] > 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
