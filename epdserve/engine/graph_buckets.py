"""Batch-size buckets for CUDA graphs: a graph is captured per bucket and a batch runs in the
smallest bucket that holds it (padding rows past the real batch)."""

from __future__ import annotations

# CUDA-graph capture happens lazily while other threads of the process may touch the GPU (an
# E+P colocated or aggregated process: the encode batcher's completion thread, frees of pinned
# buffers): "thread_local" lets them, where "global" would fail the capture; captures themselves
# run on the model thread only.
CAPTURE_ERROR_MODE = "thread_local"  # as torch.compile's CUDA-graph trees capture


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 below max_batch, then max_batch."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return buckets + [max_batch]


def smallest_at_least(value: int, choices: list[int]) -> int:
    return next(c for c in choices if c >= value)
