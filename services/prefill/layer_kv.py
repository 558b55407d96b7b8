"""KV offloading during prefill (MOM, ALGORITHMS.md §1b.3) and layer-wise hand-off.

Invariant: only the layer being computed holds KV in device memory; when a layer finishes, its
K/V (compressed first when an index is given) is copied to host memory on a side stream and
handed to `on_layer(layer, host_tensor [2, H_kv, n_l, D], ready)` exactly once, layers in order;
`ready()` returns once the bytes are on the host. The copy is a pure copy: the host tensor equals
the device KV bitwise. Where the host tensor lives is the `HostKV`'s choice: fresh pinned buffers
(`StagedHost`), or memory reserved for the layer beforehand (the cache's pool, `ReservedHost`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from epdserve.errors import RequestCancelledError
from services.prefill.fastkv import gather_kv

Ready = Callable[[], None]  # returns once a copy has landed
OnLayer = Callable[[int, torch.Tensor, Ready], None]
Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _ready_now() -> None:
    return None


def copy_to_host(destination: torch.Tensor, tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> Ready:
    """Copy `tensor` into `destination` after the work queued on the current stream: on `stream`
    (CUDA; returns what waits for the copy) or now (no stream)."""
    if stream is None:
        destination.copy_(tensor)
        return _ready_now
    stream.wait_stream(torch.cuda.current_stream(tensor.device))
    with torch.cuda.stream(stream):
        destination.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # the device memory is reused only after the copy
        done = torch.cuda.Event()
        done.record(stream)
    return done.synchronize


class HostKV(Protocol):
    def take(self, layer: int, tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> tuple[torch.Tensor, Ready]:
        """A host copy of one finished layer's KV (called on the model thread, layers in order)
        and what waits for the copy to land."""
        ...

    def close(self) -> None:
        """Take no more layers (`take` raises LayerWritesClosed); returns once the copies issued
        have landed."""
        ...


class LayerWritesClosed(RequestCancelledError):
    """The request this prefill serves is gone: its layers are no longer wanted (nor, with reserved
    memory, may they be written there)."""


class _ClosableHost:
    """A HostKV that refuses further layers once closed (the model thread then stops the prefill at
    its next layer). `close()` may be called from any thread and returns once every copy already
    issued has landed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._issued: list[Ready] = []
        self._closed = False

    def take(self, layer: int, tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> tuple[torch.Tensor, Ready]:
        with self._lock:  # a copy is issued and recorded, or refused, as one step against close()
            if self._closed:
                raise LayerWritesClosed("the prefill's request is gone (cancelled or failed)")
            host, ready = self._copy(layer, tensor, stream)
            self._issued.append(ready)
            return host, ready

    def _copy(self, layer: int, tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> tuple[torch.Tensor, Ready]:
        raise NotImplementedError

    def close(self) -> None:
        with self._lock:
            self._closed = True
            issued = list(self._issued)
        for ready in issued:
            ready()


class StagedHost(_ClosableHost):
    """Each layer into a fresh host tensor from `allocate` (pinned: the copy runs asynchronously);
    off CUDA the layer's tensor itself, no copy."""

    def __init__(self, allocate: Allocate = pinned_empty) -> None:
        super().__init__()
        self.allocate = allocate

    def _copy(self, layer: int, tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> tuple[torch.Tensor, Ready]:
        if stream is None:
            return tensor, _ready_now
        host = self.allocate(tuple(tensor.shape), tensor.dtype)
        return host, copy_to_host(host, tensor, stream)


class ReservedHost(_ClosableHost):
    """Each layer straight into memory reserved for it beforehand (`regions[layer]`, e.g. regions
    of the cache's page-locked pool: one copy from the GPU, none after). Once `close()` returns
    nothing writes into the regions any more, so they can be given back."""

    def __init__(self, regions: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.regions = list(regions)

    def _copy(self, layer: int, tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> tuple[torch.Tensor, Ready]:
        region = self.regions[layer]
        if region.shape != tensor.shape or region.dtype != tensor.dtype:
            raise ValueError(f"layer {layer}: KV {tuple(tensor.shape)} {tensor.dtype} does not fit its reserved "
                             f"region {tuple(region.shape)} {region.dtype}")
        return region, copy_to_host(region, tensor, stream)


class OffloadingKV:
    """The LayerKV of one prefill. `prefix_blocks` ([L, 2, H_kv, T, D] host tensors, in order) hold
    positions [0, P) and are moved to the device one layer at a time."""

    def __init__(self, device: torch.device, on_layer: OnLayer, *, prefix_blocks: Sequence[torch.Tensor] = (),
                 host: HostKV | None = None) -> None:
        self.device, self.on_layer = torch.device(device), on_layer
        self.host = host if host is not None else StagedHost()
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
        host, ready = self.host.take(layer, torch.stack((k[0], v[0])), self._stream)
        self.on_layer(layer, host, ready)


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
