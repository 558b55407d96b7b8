"""Paged decode attention: the torch reference against plain SDPA on contiguous K/V (lengths,
GQA, sliding window, padding rows, NaN in rows it must not read), the one-row KV write, backend
choice, and the Triton kernel under the interpreter (run with TRITON_INTERPRET=1 and triton
installed; skipped otherwise)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from epdserve.engine import paged_attention as pa
from epdserve.engine.paged_attention import paged_decode_attention, reference_paged_decode_attention, write_decode_kv

pytestmark = pytest.mark.unit

INTERPRETED = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs triton and TRITON_INTERPRET=1")


def _paged_case(lengths, heads, kv_heads, dim, block_size, width=None, dtype=torch.float32, seed=0,
                garbage=float("nan")):
    """Random contiguous K/V per sequence ([H_kv, len, D]) scattered into a paged cache with
    shuffled blocks; every row no sequence owns holds `garbage`. Returns (q, k_cache, v_cache,
    tables, seq_lens, per-sequence (k, v))."""
    gen = torch.Generator().manual_seed(seed)
    need = [max(1, -(-n // block_size)) for n in lengths]
    width = width or max(need)
    num_blocks = sum(need) + 2
    k_cache = torch.full((num_blocks, kv_heads, block_size, dim), garbage, dtype=dtype)
    v_cache = torch.full_like(k_cache, garbage)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    sequences = []
    for b, n in enumerate(lengths):
        k = torch.randn(kv_heads, n, dim, generator=gen).to(dtype)
        v = torch.randn(kv_heads, n, dim, generator=gen).to(dtype)
        blocks = [order.pop() for _ in range(need[b])]
        tables[b, : need[b]] = torch.tensor(blocks, dtype=torch.int32)
        for r in range(n):
            k_cache[blocks[r // block_size], :, r % block_size] = k[:, r]
            v_cache[blocks[r // block_size], :, r % block_size] = v[:, r]
        sequences.append((k, v))
    q = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32), sequences


def _sdpa_per_sequence(q, sequences, window=None, scale=None):
    """Plain float32 SDPA per sequence over its last `window` rows, K/V heads repeated (HF repeat_kv)."""
    outs = []
    for b, (k, v) in enumerate(sequences):
        n = k.shape[1]
        lo = 0 if window is None else max(0, n - window)
        if n == 0:
            outs.append(torch.zeros(q.shape[1:]))
            continue
        group = q.shape[1] // k.shape[0]
        keys = k[:, lo:].float().repeat_interleave(group, 0)
        values = v[:, lo:].float().repeat_interleave(group, 0)
        outs.append(F.scaled_dot_product_attention(q[b].float()[:, None], keys, values, scale=scale)[:, 0])
    return torch.stack(outs)


CASES = [  # lengths, heads, kv_heads, dim, block_size, window
    ([5], 4, 4, 16, 16, None),
    ([1, 16, 17, 40], 8, 2, 32, 16, None),
    ([33, 7, 64], 6, 2, 16, 32, 10),
    ([0, 12, 0], 4, 1, 16, 16, None),
    ([100, 3], 12, 4, 24, 16, 64),
    ([50], 4, 2, 16, 64, 50),
    ([9, 30], 2, 2, 16, 16, 1),
]


@pytest.mark.parametrize("lengths,heads,kv_heads,dim,block_size,window", CASES)
def test_reference_matches_sdpa_on_contiguous_kv(lengths, heads, kv_heads, dim, block_size, window):
    q, k_cache, v_cache, tables, seq_lens, sequences = _paged_case(lengths, heads, kv_heads, dim, block_size)
    out = reference_paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, window=window)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, _sdpa_per_sequence(q, sequences, window), rtol=1e-5, atol=1e-5)


def test_reference_in_bfloat16_computes_in_float32_and_returns_bfloat16():
    q, k_cache, v_cache, tables, seq_lens, sequences = _paged_case([20, 45], 8, 2, 32, 16, dtype=torch.bfloat16)
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale=0.3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _sdpa_per_sequence(q, sequences, scale=0.3), rtol=1e-2, atol=1e-2)


def test_padding_entries_give_zeros_and_unread_rows_never_leak():
    q, k_cache, v_cache, tables, seq_lens, _ = _paged_case([0, 3, 0], 4, 2, 16, 16, width=3)
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[2] == 0).all()


def test_write_decode_kv_appends_one_row_per_sequence_with_tensor_indexing():
    lengths = [4, 16, 9]
    q, k_cache, v_cache, tables, seq_lens, sequences = _paged_case(lengths, 4, 2, 16, 16, width=2, garbage=0.0)
    k_new, v_new = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    positions = seq_lens.long()
    blocks = tables.long().gather(1, (positions // 16)[:, None])[:, 0]
    for index_dtype in (torch.int32, torch.int64):
        write_decode_kv(k_cache, v_cache, k_new, v_new, blocks.to(index_dtype), (positions % 16).to(index_dtype))
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens + 1)
    grown = [(torch.cat([k, k_new[b][:, None]], 1), torch.cat([v, v_new[b][:, None]], 1))
             for b, (k, v) in enumerate(sequences)]
    torch.testing.assert_close(out, _sdpa_per_sequence(q, grown), rtol=1e-5, atol=1e-5)


def test_auto_never_picks_the_kernel_for_cpu_tensors(monkeypatch):
    class Exploding:
        @staticmethod
        def supports(q, k_cache):
            return True

        @staticmethod
        def paged_decode(*args):
            raise AssertionError("the Triton kernel ran on CPU tensors")

    monkeypatch.setattr(pa, "_kernel_module", lambda: Exploding)
    q, k_cache, v_cache, tables, seq_lens, sequences = _paged_case([7], 2, 1, 16, 16)
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, backend="auto")
    torch.testing.assert_close(out, _sdpa_per_sequence(q, sequences), rtol=1e-5, atol=1e-5)


def test_forcing_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(pa, "_kernel_module", lambda: None)
    q, k_cache, v_cache, tables, seq_lens, _ = _paged_case([7], 2, 1, 16, 16)
    with pytest.raises(RuntimeError, match="triton"):
        paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, backend="triton")


@pytest.mark.parametrize("kwargs,heads,match", [
    ({"backend": "cuda"}, 4, "backend"),
    ({"window": 0}, 4, "window"),
    ({}, 3, "multiple of H_kv"),
])
def test_bad_arguments_are_rejected(kwargs, heads, match):
    _, k_cache, v_cache, tables, seq_lens, _ = _paged_case([7], 2, 2, 16, 16)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(torch.randn(1, heads, 16), k_cache, v_cache, tables, seq_lens, **kwargs)


# -- the Triton kernel under the interpreter (tiny shapes: the interpreter is slow) ----------------

KERNEL_CASES = [  # lengths, heads, kv_heads, dim, block_size, window, width
    ([5, 32], 4, 2, 16, 16, None, None),          # one partition: the kernel normalises in place
    ([0, 600, 130], 8, 2, 32, 16, None, 40),      # 5 partitions of 128 rows, an empty sequence
    ([0, 600, 130], 8, 2, 32, 16, 200, 40),       # the window starts inside a partition
    ([300, 1], 6, 2, 24, 32, 129, 12),            # head_dim and group not powers of two
    ([257, 140], 4, 4, 16, 128, 20, 3),           # blocks larger than a tile
    ([520], 16, 1, 16, 16, None, 33),             # MQA: 16 query heads on one KV head
]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16 tl.dot is wrong in the interpreter
@pytest.mark.parametrize("lengths,heads,kv_heads,dim,block_size,window,width", KERNEL_CASES)
def test_kernel_matches_reference_under_the_interpreter(lengths, heads, kv_heads, dim, block_size, window, width,
                                                        dtype):
    q, k_cache, v_cache, tables, seq_lens, sequences = _paged_case(lengths, heads, kv_heads, dim, block_size,
                                                                   width=width, dtype=dtype)
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, window=window, backend="triton")
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), _sdpa_per_sequence(q, sequences, window), rtol=tol, atol=tol)


@needs_interpreter
def test_kernel_takes_strided_inputs_and_int64_lengths():
    q, k_cache, v_cache, tables, seq_lens, sequences = _paged_case([70, 200], 4, 2, 16, 16, width=20)
    q_strided = torch.stack([q, torch.zeros_like(q)], dim=2)[:, :, 0]  # like the runner's q[:, :, 0]
    lens_strided = torch.stack([seq_lens.long(), torch.zeros_like(seq_lens.long())], dim=1)[:, 0]
    out = paged_decode_attention(q_strided, k_cache, v_cache, tables, lens_strided, backend="triton")
    torch.testing.assert_close(out, _sdpa_per_sequence(q, sequences), rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_launch_plan_depends_on_shapes_only():
    from epdserve.kernels.paged_decode import plan_launch

    for batch, capacity in [(1, 131072), (32, 4096), (2, 640), (256, 16)]:
        plan = plan_launch(batch, 8, 4, 128, capacity, fp32=False)
        assert plan.partition % plan.tile_rows == 0 and plan.num_partitions * plan.partition >= capacity
        assert plan.group_pad >= 16 and plan.dim_pad == 128
    assert plan_launch(1, 8, 4, 128, 131072, fp32=False).num_partitions == 256
