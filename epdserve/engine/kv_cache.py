"""Per-sequence KV storage.

Invariant: `length` is the logical length (the next token's position). For every layer, rows
[0, stored[layer]) of `keys[layer]` / `values[layer]` hold that layer's cached keys/values; without
compression stored[layer] == length and row p is position p; a compressed prefill (FastKV) stores
fewer rows, each already rotated at its original position. Nothing past stored[layer] is read.
"""

from __future__ import annotations

import torch


class SequenceKV:
    """Contiguous K/V of one sequence, preallocated to `capacity` positions per layer.

    keys[l] / values[l]: [1, H_kv, capacity, D]. `write` stores new positions and returns views
    of everything up to them; the caller advances `length` once all layers have been written.
    """

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device
    ) -> None:
        shape = (1, num_kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0
        self.stored = [0] * num_layers

    @classmethod
    def from_layers(cls, layers: list[torch.Tensor], capacity: int, device, *, length: int | None = None
                    ) -> "SequenceKV":
        """Build from published layer tensors [2, H_kv, n_l, D] (K then V) with room for
        `capacity` rows per layer; `length` is the logical length (default: n_l, all equal)."""
        _, heads, _, head_dim = layers[0].shape
        stored = [int(layer.shape[2]) for layer in layers]
        if capacity < max(stored):
            raise ValueError(f"capacity {capacity} < cached length {max(stored)}")
        kv = cls(len(layers), heads, head_dim, capacity, layers[0].dtype, device)
        for i, layer in enumerate(layers):
            kv.keys[i][0, :, :stored[i]].copy_(layer[0])
            kv.values[i][0, :, :stored[i]].copy_(layer[1])
        kv.stored = stored
        kv.length = stored[0] if length is None else length
        return kv

    def load_prefix(self, blocks: list[torch.Tensor]) -> None:
        """Fill positions [0, P) from cached prefix blocks, each [L, 2, H_kv, T, D] (in order)."""
        start = 0
        for block in blocks:
            end = start + block.shape[3]
            for layer in range(self.num_layers):
                self.keys[layer][0, :, start:end].copy_(block[layer, 0])
                self.values[layer][0, :, start:end].copy_(block[layer, 1])
            start = end
        self.length = start
        self.stored = [start] * self.num_layers

    def block(self, start: int, end: int) -> torch.Tensor:
        """Positions [start, end) of every layer as one prefix-cache block [L, 2, H_kv, T, D]."""
        return torch.stack([torch.stack((self.keys[layer][0, :, start:end], self.values[layer][0, :, start:end]))
                            for layer in range(self.num_layers)])

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (positions [start, start+S)) after the layer's stored rows."""
        row = self.stored[layer]
        end = row + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV capacity {self.capacity} exceeded (writing up to row {end})")
        self.keys[layer][:, :, row:end].copy_(k)
        self.values[layer][:, :, row:end].copy_(v)
        self.stored[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def layer_tensor(self, layer: int) -> torch.Tensor:
        """[2, H_kv, stored, D]: this layer's K and V, stacked (the publishing layout)."""
        rows = self.stored[layer]
        return torch.stack((self.keys[layer][0, :, :rows], self.values[layer][0, :, :rows]))

    @property
    def num_layers(self) -> int:
        return len(self.keys)
