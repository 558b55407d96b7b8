"""The vision tower + projector replayed as CUDA graphs: one launch per batch instead of a few
hundred, so the encode service's model thread barely needs the GIL (its image-decoding threads
and the event loop keep it busy otherwise).

Invariant: a graph captured for batch bucket b replays exactly `VisionEncoder.encode` on the first
b rows of a static pixel buffer; rows past the real batch are padding, and the tower treats every
image independently, so padding never changes a real image's output (the bucket's size can change
GEMM tiling, i.e. rounding, exactly as batching with other requests' images already does).
Batches of another image shape, or larger than the largest bucket, run eagerly.
"""

from __future__ import annotations

import torch

from epdserve.engine.graph_buckets import CAPTURE_ERROR_MODE, batch_buckets, smallest_at_least
from epdserve.models.vision import VisionEncoder


class GraphedVisionEncoder:
    """Same contract as `VisionEncoder.encode`; the returned tensors are views of static graph
    outputs, valid until the next call (copy what must outlive it)."""

    def __init__(self, encoder: VisionEncoder, max_batch: int, image_size: int) -> None:
        self.encoder = encoder
        self.buckets = batch_buckets(max_batch)
        self.pixels = torch.zeros((self.buckets[-1], 3, image_size, image_size), dtype=encoder.dtype,
                                  device=encoder.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def capture_all(self) -> None:
        """Capture every bucket now (largest first, so the smaller ones reuse its memory)."""
        for bucket in reversed(self.buckets):
            if bucket not in self._graphs:
                self._capture(bucket)

    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        batch = pixel_values.shape[0]
        if pixel_values.shape[1:] != self.pixels.shape[1:] or batch > self.buckets[-1]:
            return self.encoder.encode(pixel_values)
        bucket = smallest_at_least(batch, self.buckets)
        graph, embeddings, hidden_states = self._graphs.get(bucket) or self._capture(bucket)
        self.pixels[:batch].copy_(pixel_values)
        graph.replay()
        return embeddings[:batch], tuple(h[:batch] for h in hidden_states)

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple]:
        pixels = self.pixels[:bucket]
        side = torch.cuda.Stream(self.pixels.device)
        side.wait_stream(torch.cuda.current_stream(self.pixels.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (kernel selection, workspaces)
            for _ in range(2):
                self.encoder.encode(pixels)
        torch.cuda.current_stream(self.pixels.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode=CAPTURE_ERROR_MODE):
            embeddings, hidden_states = self.encoder.encode(pixels)
        self._graphs[bucket] = (graph, embeddings, tuple(hidden_states))
        return self._graphs[bucket]
