"""Per-sequence KV storage.

Invariant: for every layer, positions [0, length) of `keys[layer]` / `values[layer]` hold the
keys/values of sequence positions [0, length); nothing past `length` is ever read.
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

    @classmethod
    def from_layers(cls, layers: list[torch.Tensor], capacity: int, device) -> "SequenceKV":
        """Build from published layer tensors [2, H_kv, S, D] (K then V), with room for `capacity`."""
        _, heads, length, head_dim = layers[0].shape
        if capacity < length:
            raise ValueError(f"capacity {capacity} < cached length {length}")
        kv = cls(len(layers), heads, head_dim, capacity, layers[0].dtype, device)
        for i, layer in enumerate(layers):
            kv.keys[i][0, :, :length].copy_(layer[0])
            kv.values[i][0, :, :length].copy_(layer[1])
        kv.length = length
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

    def block(self, start: int, end: int) -> torch.Tensor:
        """Positions [start, end) of every layer as one prefix-cache block [L, 2, H_kv, T, D]."""
        return torch.stack([torch.stack((self.keys[layer][0, :, start:end], self.values[layer][0, :, start:end]))
                            for layer in range(self.num_layers)])

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV capacity {self.capacity} exceeded (writing up to position {end})")
        self.keys[layer][:, :, start:end].copy_(k)
        self.values[layer][:, :, start:end].copy_(v)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def layer_tensor(self, layer: int) -> torch.Tensor:
        """[2, H_kv, length, D]: this layer's K and V, stacked (the publishing layout)."""
        return torch.stack((self.keys[layer][0, :, : self.length], self.values[layer][0, :, : self.length]))

    @property
    def num_layers(self) -> int:
        return len(self.keys)
