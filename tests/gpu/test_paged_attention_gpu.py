"""GPU tier of paged decode attention: the Triton split-K kernel against the torch reference on CUDA
(bf16 / fp16 / fp32; many batch sizes, lengths, GQA groups, head dims, block sizes, windows;
padding rows; NaN in every row no sequence owns), under CUDA-graph replay with new lengths and
tables, and its achieved bandwidth on the H200 target shapes (printed; run with -s to see it)."""

from __future__ import annotations

import pytest
import torch

from epdserve.engine.paged_attention import paged_decode_attention, reference_paged_decode_attention, write_decode_kv

pytestmark = pytest.mark.gpu
triton = pytest.importorskip("triton")

TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-4}  # of the largest |reference|


def _cache(lengths: torch.Tensor, heads: int, kv_heads: int, dim: int, block_size: int, width: int,
           dtype: torch.dtype, seed: int = 0, q_scale: float = 1.0):
    """A paged cache on CUDA with shuffled blocks: sequence b owns `width` blocks, its rows
    [0, lengths[b]) are random, every other row (and every spare block) is NaN."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    batch = lengths.shape[0]
    num_blocks = batch * width + 3
    k_cache = torch.full((num_blocks, kv_heads, block_size, dim), float("nan"), dtype=dtype, device="cuda")
    v_cache = torch.full_like(k_cache, float("nan"))
    tables = torch.randperm(num_blocks, generator=gen, device="cuda")[: batch * width].reshape(batch, width)
    for b, n in enumerate(lengths.tolist()):
        rows = torch.arange(n, device="cuda")
        blocks, offsets = tables[b, rows // block_size], rows % block_size
        k_cache[blocks, :, offsets] = torch.randn(n, kv_heads, dim, generator=gen, device="cuda").to(dtype)
        v_cache[blocks, :, offsets] = torch.randn(n, kv_heads, dim, generator=gen, device="cuda").to(dtype)
    q = (q_scale * torch.randn(batch, heads, dim, generator=gen, device="cuda")).to(dtype)
    return q, k_cache, v_cache, tables.to(torch.int32), lengths.to(device="cuda", dtype=torch.int32)


def _lengths(batch: int, capacity: int, seed: int, with_padding: bool, longest: int | None = None) -> torch.Tensor:
    """Random lengths in [1, longest or capacity], with capacity and 1 present; a 0 (padding entry)
    too when `with_padding`."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, (longest or capacity) + 1, (batch,), generator=gen)
    lengths[0] = capacity
    if batch > 1:
        lengths[-1] = 1
    if with_padding and batch > 2:
        lengths[1] = 0
    return lengths


def _assert_matches_reference(out: torch.Tensor, q, k_cache, v_cache, tables, seq_lens, window=None, scale=None):
    ref = reference_paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, window=window, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    error = (out.float() - ref.float()).abs().max().item()
    bound = TOLERANCE[q.dtype] * max(ref.float().abs().max().item(), 1e-3)
    assert error <= bound, f"max error {error:.3e} > {bound:.3e}"
    assert (out[seq_lens == 0] == 0).all()


SHAPES = [  # batch, heads, kv_heads, dim, block_size, capacity rows, longest random length, window, padding
    (32, 32, 8, 128, 16, 4096, None, None, False),     # the B=32 target
    (32, 32, 8, 128, 256, 4096, None, 1024, True),
    (1, 32, 8, 128, 16, 131072, None, None, False),    # the 128k target
    (1, 32, 8, 128, 256, 100352, None, 4096, False),
    (8, 28, 4, 128, 32, 3000, None, None, True),       # group 7
    (5, 16, 16, 64, 64, 1500, None, None, False),      # MHA
    (4, 8, 1, 256, 128, 2048, None, 300, True),        # MQA, head_dim 256
    (7, 4, 2, 16, 16, 300, None, None, True),          # tiny test models
    (6, 4, 2, 32, 16, 700, None, 64, True),
    (3, 12, 4, 80, 16, 900, None, None, False),        # head_dim not a power of two
    (48, 32, 8, 128, 16, 8192, 200, None, True),       # short sequences in a wide table: mostly dead partitions
    (2, 64, 1, 128, 16, 5000, None, None, False),      # group 64
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch,heads,kv_heads,dim,block_size,capacity,longest,window,padding", SHAPES)
def test_kernel_matches_reference(batch, heads, kv_heads, dim, block_size, capacity, longest, window, padding, dtype):
    lengths = _lengths(batch, capacity, seed=capacity, with_padding=padding, longest=longest)
    case = _cache(lengths, heads, kv_heads, dim, block_size, -(-capacity // block_size), dtype, q_scale=2.0)
    out = paged_decode_attention(*case, window=window, backend="triton")
    _assert_matches_reference(out, *case, window=window)


def test_auto_picks_the_kernel_and_a_custom_scale_is_honoured():
    case = _cache(torch.tensor([70, 1, 513]), 8, 2, 64, 16, 40, torch.bfloat16)
    auto = paged_decode_attention(*case, scale=0.05)
    forced = paged_decode_attention(*case, scale=0.05, backend="triton")
    assert torch.equal(auto, forced)
    _assert_matches_reference(auto, *case, scale=0.05)


@pytest.mark.parametrize("window", [None, 100])
def test_cuda_graph_replay_with_new_lengths_tables_and_rows(window):
    batch, heads, kv_heads, dim, block_size, width = 8, 32, 8, 128, 16, 128
    q, k_cache, v_cache, tables, seq_lens = _cache(_lengths(batch, width * block_size, 0, True), heads, kv_heads,
                                                   dim, block_size, width, torch.bfloat16)
    k_new = torch.randn(batch, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v_new, slot_blocks, slot_offsets = torch.randn_like(k_new), torch.zeros_like(seq_lens), torch.zeros_like(seq_lens)

    def step() -> torch.Tensor:
        write_decode_kv(k_cache, v_cache, k_new, v_new, slot_blocks, slot_offsets)
        return paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, window=window, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for trial in range(4):
        fresh = _cache(_lengths(batch, width * block_size, trial + 1, True), heads, kv_heads, dim, block_size,
                       width, torch.bfloat16, seed=trial + 1)
        for static, new in zip((q, k_cache, v_cache, tables, seq_lens), fresh):
            static.copy_(new)
        appended = (seq_lens - 1).clamp(min=0).long()  # overwrite each sequence's last row with k_new / v_new
        slot_blocks.copy_(tables.long().gather(1, (appended // block_size)[:, None])[:, 0].int())
        slot_offsets.copy_((appended % block_size).int())
        k_new.normal_()
        v_new.normal_()
        graph.replay()
        torch.cuda.synchronize()
        _assert_matches_reference(out, q, k_cache, v_cache, tables, seq_lens, window=window)
        live = seq_lens > 0
        assert torch.equal(k_cache[slot_blocks.long(), :, slot_offsets.long()][live], k_new[live])


def _bandwidth_case(batch: int, rows: int, block_size: int, dtype: torch.dtype = torch.bfloat16):
    """Full-length sequences over shuffled blocks, 32 query / 8 KV heads, head_dim 128."""
    heads, kv_heads, dim, width = 32, 8, 128, rows // block_size
    k_cache = torch.randn(batch * width, kv_heads, block_size, dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(batch * width, device="cuda").reshape(batch, width).to(torch.int32)
    seq_lens = torch.full((batch,), rows, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=dtype)
    return q, k_cache, v_cache, tables, seq_lens


def _gb_per_s(fn, k_cache: torch.Tensor) -> tuple[float, float]:
    """(microseconds, GB/s of K and V read once) of fn, by triton's do_bench (L2 flushed)."""
    from triton.testing import do_bench

    ms = do_bench(fn, warmup=25, rep=200)
    return ms * 1e3, 2 * k_cache.numel() * k_cache.element_size() / (ms * 1e-3) / 1e9


@pytest.mark.parametrize("batch,rows,block_size", [(32, 4096, 16), (32, 4096, 256), (1, 131072, 16),
                                                   (1, 131072, 256)])
def test_kernel_bandwidth_on_target_shapes(batch, rows, block_size):
    """H200 HBM peak is ~4.8 TB/s; the floor only catches a broken launch (too few programs,
    spills); the printed number is the measurement."""
    case = _bandwidth_case(batch, rows, block_size)
    us, gb_per_s = _gb_per_s(lambda: paged_decode_attention(*case, backend="triton"), case[1])
    print(f"\npaged decode B={batch} rows={rows} block_size={block_size}: {us:.1f} us, {gb_per_s:.0f} GB/s")
    assert gb_per_s > 1500


@pytest.mark.slow
@pytest.mark.parametrize("batch,rows", [(32, 4096), (1, 131072)])
def test_launch_tuning_sweep(batch, rows):
    """Prints GB/s per (partition, tile, warps, stages) so the defaults of `plan_launch` can be
    re-picked on new hardware; asserts only that every variant is correct."""
    from epdserve.kernels.paged_decode import DecodeTuning, paged_decode

    case = _bandwidth_case(batch, rows, 16)

    def run(tuning: DecodeTuning = DecodeTuning()) -> torch.Tensor:
        return paged_decode(*case, 128 ** -0.5, None, tuning)

    reference = run()
    print(f"\nB={batch} rows={rows}: default plan {_gb_per_s(run, case[1])[1]:.0f} GB/s")
    for partition in (128, 256, 512, 1024):
        for tile_rows, num_warps, num_stages in ((32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 3)):
            tuning = DecodeTuning(partition, tile_rows, num_warps, num_stages)
            torch.testing.assert_close(run(tuning), reference, rtol=2e-2, atol=2e-2)
            us, gb_per_s = _gb_per_s(lambda tuning=tuning: run(tuning), case[1])
            print(f"  partition={partition:5d} tile={tile_rows:3d} warps={num_warps} stages={num_stages}: "
                  f"{us:8.1f} us {gb_per_s:6.0f} GB/s")
