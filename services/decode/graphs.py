"""Decode steps replayed as CUDA graphs: one launch per step instead of ~15 per layer.

Invariant: a graph captured for (batch bucket b, table width w) replays exactly
`BatchRunner.run` on the first b entries of the static `rows` / `tokens` buffers with block tables
cut to w blocks; entries past the real batch hold the KV cache's padding row, whose step touches
only its scratch block and is reset inside the step, so padding never changes a real sequence.
Captures happen lazily, the first time a (bucket, width) pair is needed, with the static rows set
to padding so the capture's own steps touch no real sequence.
"""

from __future__ import annotations

import torch

from epdserve.engine.graph_buckets import CAPTURE_ERROR_MODE, batch_buckets, smallest_at_least
from services.decode.runner import BatchRunner

MIN_TABLE_BLOCKS = 16


def width_bucket(blocks: int, max_blocks: int) -> int:
    """Next power of two >= blocks (at least MIN_TABLE_BLOCKS), capped at the table width."""
    width = MIN_TABLE_BLOCKS
    while width < blocks:
        width *= 2
    return min(width, max_blocks)


class CudaGraphRunner:
    """Same contract as BatchRunner.run; the returned logits are a view valid until the next run."""

    def __init__(self, runner: BatchRunner, max_batch: int) -> None:
        self.runner, self.kv, self.decoder = runner, runner.kv, runner.decoder
        self.buckets = batch_buckets(max_batch)
        device = self.kv.device
        self.rows = torch.full((self.buckets[-1],), self.kv.padding_row, dtype=torch.int64, device=device)
        self.tokens = torch.zeros(self.buckets[-1], dtype=torch.int64, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def run(self, rows: torch.Tensor, tokens: torch.Tensor, max_kv_rows: int) -> torch.Tensor:
        batch = rows.shape[0]
        bucket = smallest_at_least(batch, self.buckets)
        width = width_bucket(self.kv.blocks_for(max_kv_rows), self.kv.shape.max_blocks_per_row)
        graph, logits = self._graphs.get((bucket, width)) or self._capture(bucket, width)
        self.rows[:batch].copy_(rows)
        self.rows[batch:bucket].fill_(self.kv.padding_row)
        self.tokens[:batch].copy_(tokens)
        graph.replay()
        return logits[:batch]

    def _capture(self, bucket: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        rows, tokens = self.rows[:bucket], self.tokens[:bucket]
        rows.fill_(self.kv.padding_row)
        max_rows = width * self.kv.shape.block_size
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: kernel compilation and autotuning outside the capture
            for _ in range(2):
                self.runner.run(rows, tokens, max_rows)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode=CAPTURE_ERROR_MODE):
            logits = self.runner.run(rows, tokens, max_rows)
        self._graphs[(bucket, width)] = (graph, logits)
        return graph, logits
