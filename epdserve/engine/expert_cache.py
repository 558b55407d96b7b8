"""Bookkeeping of the offloaded-MoE expert cache (ProMoE, ALGORITHMS.md §6): per-layer slots with
LRU order and pins, and the two-priority queue of chunk copy tasks.

Pure Python: no tensors, no threads, no clocks. The owner (`ExpertOffloader`) holds one lock around
every call, moves the bytes, and decides when tasks run. An expert is copied as three chunks, its
three linear weights in the order w1 (gate), w3 (up), w2 (down).
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable, Sequence
from typing import NamedTuple

CHUNKS = 3  # w1, w3, w2


class Priority(enum.IntEnum):
    HIGH = 0  # precise: the gate chose this expert for the layer being computed
    LOW = 1   # speculative: a predictor guessed it for a later layer


class ChunkTask(NamedTuple):
    layer: int
    expert: int
    chunk: int  # 0 = w1, 1 = w3, 2 = w2
    priority: Priority


class Group(enum.IntEnum):
    """Where a precise expert stands at gate time; execution order is CACHED, PARTIAL, NOT_STARTED."""

    CACHED = 0       # ready_chunk == 3
    PARTIAL = 1      # owns a slot, some chunks still to copy (chunk 0 may be in flight)
    NOT_STARTED = 2  # owns no slot


class Claim(NamedTuple):
    slot: int
    evicted: int  # the expert that left the slot (every slot always holds an expert)


class ExpertCache:
    """`capacity` slots per layer, each always holding one expert of its layer.

    Starts full: slot c of every layer holds expert c, fully copied (the owner fills the device
    region to match). Mutators: `touch`, `pin`, `unpin`, `claim`, `advance`. Raises ValueError on a
    capacity outside [1, num_experts]; AssertionError on a protocol violation by the caller.
    """

    def __init__(self, num_layers: int, num_experts: int, capacity: int) -> None:
        if not 1 <= capacity <= num_experts:
            raise ValueError(f"capacity must be in [1, {num_experts}] experts per layer (got {capacity})")
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, capacity
        self._owner = [list(range(capacity)) for _ in range(num_layers)]           # slot -> expert
        self._slot = [{e: e for e in range(capacity)} for _ in range(num_layers)]  # expert -> slot
        self._ready = [dict.fromkeys(range(capacity), CHUNKS) for _ in range(num_layers)]
        self._lru = [collections.OrderedDict.fromkeys(range(capacity)) for _ in range(num_layers)]  # oldest first
        self._pins: list[set[int]] = [set() for _ in range(num_layers)]

    # ---- queries -----------------------------------------------------------------------------------
    def ready_chunk(self, layer: int, expert: int) -> int:
        """Chunks of `expert` already in its slot (0 when it has none)."""
        return self._ready[layer].get(expert, 0)

    def slot_of(self, layer: int, expert: int) -> int | None:
        return self._slot[layer].get(expert)

    def resident(self, layer: int) -> list[int]:
        """Experts owning a slot of `layer`, in slot order (len == capacity)."""
        return list(self._owner[layer])

    def pinned(self, layer: int) -> frozenset[int]:
        return frozenset(self._pins[layer])

    def group(self, layer: int, expert: int) -> Group:
        if self.ready_chunk(layer, expert) == CHUNKS:
            return Group.CACHED
        return Group.PARTIAL if expert in self._slot[layer] else Group.NOT_STARTED

    def victim(self, layer: int) -> int | None:
        """The least recently used unpinned expert of `layer`, or None when every slot is pinned."""
        return next((e for e in self._lru[layer] if e not in self._pins[layer]), None)

    def wants(self, task: ChunkTask) -> bool:
        """Whether `task` still has work: chunk 0 of an expert with no slot, or chunk c of an
        expert whose slot holds exactly c chunks (duplicates and evicted experts are dropped)."""
        ready, has_slot = self.ready_chunk(task.layer, task.expert), task.expert in self._slot[task.layer]
        return not has_slot if task.chunk == 0 else has_slot and ready == task.chunk

    # ---- mutators ----------------------------------------------------------------------------------
    def touch(self, layer: int, expert: int) -> None:
        """Mark a resident expert most recently used (no-op otherwise)."""
        if expert in self._slot[layer]:
            self._lru[layer].move_to_end(expert)

    def pin(self, layer: int, experts: Iterable[int]) -> None:
        """Pin exactly `experts` in `layer` (replacing pins an aborted forward may have left)."""
        self._pins[layer] = set(experts)

    def unpin(self, layer: int, expert: int) -> None:
        self._pins[layer].discard(expert)

    def claim(self, layer: int, expert: int) -> Claim:
        """Chunk 0 of `expert` starts: its slot is the victim's, the victim is evicted (ready_chunk
        reset to 0) and `expert` becomes most recently used with ready_chunk 0."""
        assert expert not in self._slot[layer], f"expert {expert} of layer {layer} already owns a slot"
        evicted = self.victim(layer)
        assert evicted is not None, f"every slot of layer {layer} is pinned"
        slot = self._slot[layer].pop(evicted)
        del self._ready[layer][evicted]
        del self._lru[layer][evicted]
        self._owner[layer][slot] = expert
        self._slot[layer][expert] = slot
        self._ready[layer][expert] = 0
        self._lru[layer][expert] = None
        return Claim(slot, evicted)

    def advance(self, layer: int, expert: int, chunk: int) -> None:
        """Chunk `chunk` of `expert` is in its slot: ready_chunk becomes chunk + 1."""
        assert self.ready_chunk(layer, expert) == chunk and expert in self._slot[layer]
        self._ready[layer][expert] = chunk + 1


def execution_order(cache: ExpertCache, layer: int, experts: Sequence[int]) -> list[int]:
    """Reordered inference: cached ⊕ partially fetched ⊕ not started, each group in input order."""
    return sorted(experts, key=lambda e: cache.group(layer, e))  # sorted() is stable


class PrefetchQueue:
    """Two FIFO lanes; `pop` always takes HIGH first, so a HIGH task is never behind a LOW one."""

    def __init__(self) -> None:
        self._lanes = {Priority.HIGH: collections.deque(), Priority.LOW: collections.deque()}

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def push(self, task: ChunkTask) -> None:
        self._lanes[task.priority].append(task)

    def push_front(self, task: ChunkTask) -> None:
        """Put back a task that could not start yet (it keeps its place ahead of its lane)."""
        self._lanes[task.priority].appendleft(task)

    def pop(self) -> ChunkTask | None:
        for priority in (Priority.HIGH, Priority.LOW):
            if self._lanes[priority]:
                return self._lanes[priority].popleft()
        return None

    def drop_low(self, layer: int) -> int:
        """Early preemption: remove every LOW task of `layer`; returns how many were removed."""
        low = self._lanes[Priority.LOW]
        kept = [task for task in low if task.layer != layer]
        removed = len(low) - len(kept)
        low.clear()
        low.extend(kept)
        return removed

    def snapshot(self) -> list[ChunkTask]:
        """The queued tasks in the order `pop` would return them."""
        return [*self._lanes[Priority.HIGH], *self._lanes[Priority.LOW]]
