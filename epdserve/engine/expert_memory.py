"""Where offloaded experts live (ALGORITHMS.md §6): all of them in host memory (`HostExperts`, pinned
on CUDA), some in the pre-allocated device region of per-layer slots (`DeviceSlots`), and the
`ChunkCopier` that moves one chunk (one of an expert's three linear weights) between the two.
The cache protocol that decides what moves when is in `expert_offload.py`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch

from epdserve.engine.expert_cache import CHUNKS, ChunkTask
from epdserve.engine.host_memory import page_locked, unpin
from epdserve.models.layers import MixtralMoE


class ExpertWeights(NamedTuple):
    w1: torch.Tensor  # [I, d] gate
    w3: torch.Tensor  # [I, d] up
    w2: torch.Tensor  # [d, I] down


class HostExperts:
    """Every layer's experts in host memory: weights[l] is [E, 3, n] (n = I * d), rows w1, w3, w2 of
    each expert flattened. Owns that memory (read-only once built); when pinned, it is unpinned when
    this object is garbage-collected."""

    def __init__(self, weights: list[torch.Tensor], intermediate: int, hidden: int) -> None:
        if any(w.dim() != 3 or w.shape[1] != CHUNKS or w.shape[2] != intermediate * hidden for w in weights):
            raise ValueError("host expert weights must be [E, 3, intermediate * hidden] per layer")
        self.weights, self.intermediate, self.hidden = weights, intermediate, hidden

    @classmethod
    def from_modules(cls, modules: Sequence[MixtralMoE], *, pin: bool) -> "HostExperts":
        """Copy each MixtralMoE's experts into host memory, page-locked first when `pin` (needs CUDA).
        The modules are not modified."""
        w1 = modules[0].experts[0].w1.weight
        intermediate, hidden = w1.shape
        weights = [torch.empty((len(m.experts), CHUNKS, w1.numel()), dtype=w1.dtype) for m in modules]
        host = cls(weights, intermediate, hidden)
        if pin:
            host.pin()
        with torch.no_grad():
            for buf, module in zip(weights, modules):
                for e, expert in enumerate(module.experts):
                    for chunk, linear in enumerate((expert.w1, expert.w3, expert.w2)):
                        buf[e, chunk].copy_(linear.weight.reshape(-1))
        return host

    def pin(self) -> None:
        """Page-lock every layer's buffer in place with cudaHostRegister: exact sizes, where the
        caching host allocator (`pin_memory=True`) would round each block up to a power of two.
        Raises RuntimeError when CUDA refuses."""
        for w in self.weights:
            page_locked(w)
        weakref.finalize(self, unpin, [w.data_ptr() for w in self.weights])

    @property
    def num_layers(self) -> int:
        return len(self.weights)

    @property
    def num_experts(self) -> int:
        return self.weights[0].shape[0]

    @property
    def chunk_bytes(self) -> int:
        return self.weights[0].shape[2] * self.weights[0].element_size()

    @property
    def expert_bytes(self) -> int:
        return CHUNKS * self.chunk_bytes

    @property
    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights)

    def chunk(self, layer: int, expert: int, chunk: int) -> torch.Tensor:
        return self.weights[layer][expert, chunk]


class DeviceSlots:
    """The pre-allocated device region [L, C, 3, n], filled so that slot c holds expert c, and on
    CUDA two events per slot: `ready` (after a chunk copy; compute waits on it) and `free` (after
    the compute that read the slot; the next chunk-0 copy waits on it). Owns the region."""

    def __init__(self, host: HostExperts, capacity: int, device: torch.device) -> None:
        shape = (host.num_layers, capacity, CHUNKS, host.weights[0].shape[2])
        self.region = torch.empty(shape, dtype=host.weights[0].dtype, device=device)
        for layer, weights in enumerate(host.weights):
            self.region[layer].copy_(weights[:capacity])
        self.intermediate, self.hidden = host.intermediate, host.hidden
        cuda = device.type == "cuda"
        self.ready = _events(host.num_layers, capacity) if cuda else None
        self.free = _events(host.num_layers, capacity) if cuda else None

    def chunk(self, layer: int, slot: int, chunk: int) -> torch.Tensor:
        return self.region[layer, slot, chunk]

    def release(self) -> None:
        """Free the region (after every copy and compute touching it has finished); the slots are
        unusable afterwards."""
        self.region = self.region.new_empty((0, 0, CHUNKS, 0))

    def weights(self, layer: int, slot: int) -> ExpertWeights:
        i, d = self.intermediate, self.hidden
        w = self.region[layer, slot]
        return ExpertWeights(w[0].view(i, d), w[1].view(i, d), w[2].view(d, i))


class ChunkCopier:
    """Copies one chunk host -> slot and returns once the copy has completed. CUDA: on a side stream,
    after the slot's free event (chunk 0), then records the slot's ready event and waits for it."""

    def __init__(self, host: HostExperts, slots: DeviceSlots, device: torch.device) -> None:
        self.host, self.slots = host, slots
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, task: ChunkTask, slot: int) -> None:
        src = self.host.chunk(task.layer, task.expert, task.chunk)
        dst = self.slots.chunk(task.layer, slot, task.chunk)
        with torch.inference_mode():  # the region may have been allocated under inference mode
            if self.stream is None:
                dst.copy_(src)
                return
            with torch.cuda.stream(self.stream):
                if task.chunk == 0:
                    self.stream.wait_event(self.slots.free[task.layer][slot])
                dst.copy_(src, non_blocking=True)
                event = self.slots.ready[task.layer][slot]
                event.record(self.stream)
        event.synchronize()

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def _events(num_layers: int, capacity: int) -> list[list[torch.cuda.Event]]:
    return [[torch.cuda.Event() for _ in range(capacity)] for _ in range(num_layers)]
