"""Split-K ("flash-decoding") attention of one new query per sequence over a paged KV cache.

Invariant: program (b, kv_head, p) reads exactly the rows [max(lo, p * P), min(seq_len, (p + 1) * P))
of sequence b, lo = max(0, seq_len - window), through its block table (row r at block
`block_tables[b, r // block_size]`, offset r % block_size), and folds them into an online-softmax
partial (running max m, sum l, unnormalised acc; base-2 exponent) for the `group` query heads of
that KV head. A partition is live iff that range is non-empty; the combine step reads live
partials only, so m' = max m_p, out = sum_p 2^(m_p - m') acc_p / sum_p 2^(m_p - m') l_p is exact
softmax attention over [lo, seq_len), and an empty sequence (seq_len 0) gives zeros. The grid and
the scratch sizes depend on tensor shapes only (never on seq_lens), so a launch can be captured in
a CUDA graph and replayed with any lengths up to the table's capacity.

Supported: q / cache dtypes fp16, bf16, fp32 (fp32 dots in "ieee" precision, not tf32); any
head_dim <= 256 (padded to a power of two >= 16, so 16, 80, 96 work too); any GQA group (padded to
a power of two >= 16 rows for tl.dot); any block_size (tested: powers of two 16..256); any strides
(a unit stride on head_dim gives vectorised loads). Larger head dims: the torch reference.
Importing this module imports triton; `epdserve.engine.paged_attention` imports it lazily.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

NO_WINDOW = 1 << 30         # a window no sequence reaches: lo = max(0, seq_len - NO_WINDOW) = 0
MAX_HEAD_DIM = 256          # larger head dims: use the torch reference
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class DecodeLaunch:
    """Launch shape of one call; a pure function of tensor shapes (see `plan_launch`)."""

    group_pad: int       # query heads per KV head, padded to a power of two >= 16 (tl.dot's minimum)
    dim_pad: int         # head_dim padded to a power of two >= 16
    tile_rows: int       # KV rows per inner-loop tile (gathered through the block table)
    partition: int       # KV rows per program; a multiple of tile_rows
    num_partitions: int  # ceil(table capacity / partition)
    num_warps: int
    num_stages: int
    combine_chunk: int   # partitions merged per step of the combine kernel (power of two <= 32)


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    """Overrides of `plan_launch`'s choices (None: its shape-based default); for benchmarks."""

    partition: int | None = None   # KV rows per program; a multiple of tile_rows
    tile_rows: int | None = None   # a power of two >= 16
    num_warps: int | None = None
    num_stages: int | None = None


def plan_launch(batch: int, num_kv_heads: int, group: int, head_dim: int, capacity: int, fp32: bool,
                tuning: DecodeTuning = DecodeTuning(), target_programs: int = 512) -> DecodeLaunch:
    """Pick tile and partition sizes from shapes alone: 512-row partitions, halved (down to 128)
    while the grid (batch x kv heads x partitions) has fewer than `target_programs` programs.
    Tiles and warps were chosen so that no variant spills registers on sm_90 (fp32 dots run on
    CUDA cores in "ieee" precision and need smaller tiles per warp). Raises ValueError on a
    tuning whose partition is not a multiple of its tile."""
    dim_pad = max(16, triton.next_power_of_2(head_dim))
    partition = 512
    while partition > 128 and batch * num_kv_heads * math.ceil(capacity / partition) < target_programs:
        partition //= 2
    if fp32:
        tile_rows, num_warps, num_stages = 32, 8, 2
    else:
        tile_rows, num_warps, num_stages = (64, 4, 3) if dim_pad <= 128 else (32, 4, 2)
    partition, tile_rows = tuning.partition or partition, tuning.tile_rows or tile_rows
    if partition % tile_rows:
        raise ValueError(f"partition {partition} is not a multiple of tile_rows {tile_rows}")
    num_partitions = max(1, math.ceil(capacity / partition))
    return DecodeLaunch(group_pad=max(16, triton.next_power_of_2(group)), dim_pad=dim_pad, tile_rows=tile_rows,
                        partition=partition, num_partitions=num_partitions,
                        num_warps=tuning.num_warps or num_warps, num_stages=tuning.num_stages or num_stages,
                        combine_chunk=min(32, triton.next_power_of_2(num_partitions)))


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel handles these tensors (dtype and head_dim); otherwise use the reference."""
    return (q.dtype in KERNEL_DTYPES and k_cache.dtype in KERNEL_DTYPES and q.shape[-1] <= MAX_HEAD_DIM
            and q.shape[1] % k_cache.shape[1] == 0)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, window: int | None,
                 tuning: DecodeTuning = DecodeTuning()) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks, H_kv, block_size, D] (same dtype; q is cast to it for the
    dot products, accumulation is fp32); block_tables [B, W] int32/int64; seq_lens [B] int32/int64
    (any strides). Returns a new [B, H, D] tensor in q's dtype. No host sync, no value-dependent
    launch: safe under CUDA-graph capture once compiled (call it once before capturing)."""
    batch, heads, dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    fp32 = k_cache.dtype == torch.float32
    plan = plan_launch(batch, kv_heads, group, dim, block_tables.shape[1] * block_size, fp32, tuning)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    single = plan.num_partitions == 1
    scratch = (batch, heads, plan.num_partitions)
    maxes = torch.empty(scratch if not single else (1,), dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxes)
    accs = torch.empty((*scratch, dim) if not single else (1,), dtype=torch.float32, device=q.device)
    window = NO_WINDOW if window is None else min(window, NO_WINDOW)  # stays an int32 in the kernels
    scale_log2 = scale * 1.4426950408889634  # scores in base 2: exp(x * scale) = 2^(x * scale * log2 e)
    _partition_kernel[(batch, kv_heads, plan.num_partitions)](
        q, k_cache, v_cache, block_tables, seq_lens, out, maxes, sums, accs, scale_log2, window,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), seq_lens.stride(0),
        *out.stride(),
        GROUP=group, GROUP_PAD=plan.group_pad, HEAD_DIM=dim, DIM_PAD=plan.dim_pad, BLOCK_SIZE=block_size,
        TILE=plan.tile_rows, PARTITION=plan.partition, SINGLE=single, IEEE=fp32,
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    if not single:
        _combine_kernel[(batch, heads)](
            maxes, sums, accs, seq_lens, out, window, plan.num_partitions, seq_lens.stride(0), *out.stride(),
            HEAD_DIM=dim, DIM_PAD=plan.dim_pad, PARTITION=plan.partition, CHUNK=plan.combine_chunk, num_warps=4)
    return out


@triton.jit
def _live_range(lens_ptr, stride_lb, window):
    """(seq_len, lo) of this program's sequence: it attends rows [lo, seq_len)."""
    seq_len = tl.load(lens_ptr + tl.program_id(0) * stride_lb).to(tl.int32)
    return seq_len, tl.maximum(seq_len - window, 0)


@triton.jit
def _partition_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, scale_log2, window,
                      stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kr, stride_kd,
                      stride_vb, stride_vh, stride_vr, stride_vd, stride_tb, stride_tn, stride_lb,
                      stride_ob, stride_oh, stride_od,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PARTITION: tl.constexpr,
                      SINGLE: tl.constexpr, IEEE: tl.constexpr):
    """One (sequence, KV head, partition): online softmax over the partition's live rows for the
    KV head's query group; writes the output (SINGLE) or the partial (m, l, acc) when live."""
    b, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len, lo = _live_range(lens_ptr, stride_lb, window)
    start = tl.maximum(lo, part * PARTITION)
    end = tl.minimum(seq_len, (part + 1) * PARTITION)
    first = part * PARTITION + ((start - part * PARTITION) // TILE) * TILE  # tiles stay TILE-aligned

    g, d, n = tl.arange(0, GROUP_PAD), tl.arange(0, DIM_PAD), tl.arange(0, TILE)
    heads = kv_head * GROUP + g
    head_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd, mask=head_mask, other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    k_base = k_ptr + kv_head * stride_kh + d[None, :] * stride_kd
    v_base = v_ptr + kv_head * stride_vh + d[None, :] * stride_vd
    table = tables_ptr + b * stride_tb

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for tile in range(first, end, TILE):
        rows = tile + n
        valid = (rows >= start) & (rows < end)
        blocks = tl.load(table + (rows // BLOCK_SIZE) * stride_tn, mask=valid, other=0).to(tl.int64)
        slots = rows % BLOCK_SIZE
        row_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_base + blocks[:, None] * stride_kb + slots[:, None] * stride_kr, mask=row_mask, other=0.0)
        v = tl.load(v_base + blocks[:, None] * stride_vb + slots[:, None] * stride_vr, mask=row_mask, other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: every visited tile has a valid row
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if SINGLE:  # one partition covers the whole table: normalise here (0 / 1 = 0 for an empty sequence)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_mask)
    else:  # dead partitions write nothing: the combine step never reads them
        live = (tl.zeros([GROUP_PAD], tl.int32) + end) > start  # as a vector: the interpreter rejects scalar masks
        index = (b * tl.num_programs(1) * GROUP + heads).to(tl.int64) * tl.num_programs(2) + part
        tl.store(m_ptr + index, m_i, mask=(g < GROUP) & live)
        tl.store(l_ptr + index, l_i, mask=(g < GROUP) & live)
        tl.store(acc_ptr + index[:, None] * HEAD_DIM + d[None, :], acc, mask=head_mask & live[:, None])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, lens_ptr, out_ptr, window, num_partitions, stride_lb,
                    stride_ob, stride_oh, stride_od,
                    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, PARTITION: tl.constexpr, CHUNK: tl.constexpr):
    """One (sequence, query head): merge the live partitions' partials, CHUNK at a time."""
    b, head = tl.program_id(0), tl.program_id(1)
    seq_len, lo = _live_range(lens_ptr, stride_lb, window)
    part_lo = lo // PARTITION
    part_hi = (seq_len + PARTITION - 1) // PARTITION  # live: [part_lo, part_hi), empty when seq_len == 0
    base = ((b * tl.num_programs(1) + head) * num_partitions).to(tl.int64)
    c, d = tl.arange(0, CHUNK), tl.arange(0, DIM_PAD)

    m_run = tl.max(tl.full([CHUNK], float("-inf"), tl.float32), 0)
    l_run = tl.sum(tl.zeros([CHUNK], tl.float32), 0)
    acc = tl.zeros([DIM_PAD], tl.float32)
    for chunk in range(part_lo, part_hi, CHUNK):
        parts = chunk + c
        live = parts < part_hi
        m = tl.load(m_ptr + base + parts, mask=live, other=float("-inf"))
        ls = tl.load(l_ptr + base + parts, mask=live, other=0.0)
        accs = tl.load(acc_ptr + (base + parts)[:, None] * HEAD_DIM + d[None, :],
                       mask=live[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))  # finite: every visited chunk has a live partition
        alpha = tl.exp2(m_run - m_new)
        weights = tl.exp2(m - m_new)
        l_run = l_run * alpha + tl.sum(weights * ls, 0)
        acc = acc * alpha + tl.sum(weights[:, None] * accs, 0)
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)
