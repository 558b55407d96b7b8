"""MOM mini-sequence processing (ALGORITHMS.md §1): per-token work over chunks of the sequence.

Invariant: every op run here is per-token (MLP / MoE, norms, LM head), so running it over row
chunks [a, b) and writing each chunk's rows is the same computation as running it over the whole
sequence; transient memory is bounded by the chunk (C x FFN width, C x vocab) instead of S x ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class MiniSequenceConfig:
    chunk_tokens: int = 4096        # MOM's chunk_size: C = max(chunk_tokens // batch, min_chunk_tokens)
    min_chunk_tokens: int = 1024
    last_position_only: bool = True  # the last layer's MLP, final norm and LM head see only the last row

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1 or self.min_chunk_tokens < 1:
            raise ValueError(f"chunk_tokens and min_chunk_tokens must be >= 1 (got {self.chunk_tokens}, "
                             f"{self.min_chunk_tokens})")

    def chunk_length(self, batch: int = 1) -> int:
        return max(self.chunk_tokens // max(batch, 1), self.min_chunk_tokens)


def chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of ceil(length / chunk) near-equal mini-sequences, none longer than `chunk`.
    Equal sizes instead of a short tail: no tiny GEMM at the end (BLAS libraries switch kernels,
    and rounding, for very short matrices), and balanced work per launch."""
    count = -(-length // chunk)
    base, extra = divmod(length, count)
    bounds, start = [], 0
    for i in range(count):
        end = start + base + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


def residual_chunks(delta: Callable[[int, int], torch.Tensor], h: torch.Tensor, chunk: int) -> torch.Tensor:
    """h + update for h [B, S, d], where delta(start, end) computes the update of rows [start, end)
    (reading only those rows of h); done chunk by chunk into h itself (h is consumed). With
    S <= chunk this is exactly `h + delta(0, S)`."""
    if h.shape[1] <= chunk:
        return h + delta(0, h.shape[1])
    for start, end in chunk_bounds(h.shape[1], chunk):
        rows = h[:, start:end]
        rows.copy_(rows + delta(start, end))
    return h


def map_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn over row chunks of x [S, ...], results written into one preallocated output."""
    if x.shape[0] <= chunk:
        return fn(x)
    out = None
    for start, end in chunk_bounds(x.shape[0], chunk):
        part = fn(x[start:end])
        if out is None:
            out = part.new_empty((x.shape[0], *part.shape[1:]))
        out[start:end] = part
    return out
