"""KV offloading during prefill (MOM, ALGORITHMS.md §1b.3) and layer-wise hand-off.

Invariant: only the layer being computed holds KV in device memory; when a layer finishes, its
K/V (compressed first when an index is given) is copied to host memory on a side stream and
handed to `on_layer(layer, host_tensor [2, H_kv, n_l, D], ready)` exactly once, layers in order;
`ready()` returns once the bytes are on the host. The copy is a pure copy: the host tensor equals
the device KV bitwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from services.prefill.fastkv import gather_kv

OnLayer = Callable[[int, torch.Tensor, Callable[[], None]], None]
Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _ready_now() -> None:
    return None


class OffloadingKV:
    """The LayerKV of one prefill. `prefix_blocks` ([L, 2, H_kv, T, D] host tensors, in order) hold
    positions [0, P) and are moved to the device one layer at a time."""

    def __init__(self, device: torch.device, on_layer: OnLayer, *, prefix_blocks: Sequence[torch.Tensor] = (),
                 allocate: Allocate = pinned_empty) -> None:
        self.device, self.on_layer, self.allocate = torch.device(device), on_layer, allocate
        self.prefix_blocks = list(prefix_blocks)
        self.prefix_length = sum(int(block.shape[3]) for block in self.prefix_blocks)
        self._current: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start != self.prefix_length:
            raise ValueError(f"prefill writes start at the cached prefix ({self.prefix_length}), got {start}")
        if self.prefix_blocks:
            cached = torch.cat([block[layer] for block in self.prefix_blocks], dim=2).to(self.device, k.dtype)
            k, v = torch.cat((cached[0][None], k), dim=2), torch.cat((cached[1][None], v), dim=2)
        self._current = (layer, k, v)
        return k, v

    def current_keys(self) -> torch.Tensor:
        """[H_kv, n, D]: every key of the layer being computed (RoPE applied)."""
        assert self._current is not None
        return self._current[1][0]

    def finish(self, layer: int, keep_index: torch.Tensor | None = None) -> None:
        """The layer's attention is done: keep `keep_index` [H_kv, b] (all when None), offload it."""
        assert self._current is not None and self._current[0] == layer, "finish() must follow write() of the layer"
        _, k, v = self._current
        self._current = None
        if keep_index is not None:
            k, v = gather_kv(k, v, keep_index)
        stacked = torch.stack((k[0], v[0]))
        host, ready = self._to_host(stacked)
        self.on_layer(layer, host, ready)

    def _to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
        if self._stream is None:
            return tensor, _ready_now
        host = self.allocate(tuple(tensor.shape), tensor.dtype)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self._stream)  # the device memory is reused only after the copy
            done = torch.cuda.Event()
            done.record(self._stream)
        return host, done.synchronize


class CollectedLayers:
    """An `on_layer` that keeps every layer; `layers()` waits for the copies."""

    def __init__(self) -> None:
        self._layers: list[tuple[torch.Tensor, Callable[[], None]]] = []

    def __call__(self, layer: int, tensor: torch.Tensor, ready: Callable[[], None]) -> None:
        assert layer == len(self._layers), "layers arrive in order"
        self._layers.append((tensor, ready))

    def layers(self) -> list[torch.Tensor]:
        for _, ready in self._layers:
            ready()
        return [tensor for tensor, _ in self._layers]
