"""Batch-size buckets for CUDA graphs: a graph is captured per bucket and a batch runs in the
smallest bucket that holds it (padding rows past the real batch)."""

from __future__ import annotations


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 below max_batch, then max_batch."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return buckets + [max_batch]


def smallest_at_least(value: int, choices: list[int]) -> int:
    return next(c for c in choices if c >= value)
