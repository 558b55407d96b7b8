"""Paged KV whose later layers live in pinned host memory: decode contexts larger than the GPU.

Invariant (between steps, and for every step's reads): for a layer l < gpu_layers the KV is where
`PagedKVCache` keeps it (device pool, row j of row r at `tables[r, j // bs]`); for an offloaded
layer l the host pool `host_keys[l - gpu_layers]` (same block ids, same tables) holds every stored
row and is the only copy that outlives a step. A staging buffer (two of them, offloaded layer k
uses buffer k % 2) is a per-step scratch copy: within a step it holds, at the blocks of the step's
`StagingPlan`, the host blocks the layer attends (copied on the side stream, fenced by the buffer's
`ready` event before compute reads it and by its `free` event before the next fill) plus the
step's new row, written by compute. The new rows go back to the host pools before `run` returns
(one device -> pinned copy, event sync, CPU scatter), so the host pools are written only by the
CPU while no host -> device copy is in flight. The running reservations never need more staging
blocks than one buffer has: admission refuses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from epdserve.engine.host_memory import pinned_zeros, unpin
from epdserve.engine.paged_kv import PagedKVCache, PagedKVShape, StepSlots

STAGING_BUFFERS = 2


class CopyRun(NamedTuple):
    """`blocks` consecutive host blocks from `host` copied to staging blocks from `staging`."""

    host: int
    staging: int
    blocks: int


@dataclasses.dataclass(frozen=True)
class StagingPlan:
    """What one step stages, built once per step by `OffloadedKVCache.plan_step` (B sequences,
    L layers, L_off offloaded). Device tensors are on the cache's device; host ones on the CPU."""

    slots: StepSlots           # the step's slots with offloaded layers' blocks renumbered into staging
    copies: tuple[tuple[CopyRun, ...], ...]  # per offloaded layer: host -> staging block runs
    host_blocks: torch.Tensor  # CPU int64 [B, L_off]: host block receiving each new row
    host_offsets: torch.Tensor  # CPU int64 [B, L_off]: offset of the new row in that block
    copy_bytes: int            # host -> device bytes of the whole step (K and V)

    @property
    def batch(self) -> int:
        return int(self.host_blocks.shape[0])


@dataclasses.dataclass(frozen=True)
class PendingWriteBack:
    """A step's new offloaded rows on their way to pinned host memory (see `start_write_back`)."""

    plan: StagingPlan
    copied: torch.cuda.Event | None  # recorded after the device -> host copy (None off CUDA)


# -- block runs -------------------------------------------------------------------------------
def block_runs(ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive block ids: (index in `ids`, first id, length)."""
    runs: list[tuple[int, int, int]] = []
    for index, block in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            start, first, length = runs[-1]
            runs[-1] = (start, first, length + 1)
        else:
            runs.append((index, block, 1))
    return runs


def merge_runs(runs: list[CopyRun]) -> tuple[CopyRun, ...]:
    """Join runs that continue each other on both sides (one copy instead of two)."""
    merged: list[CopyRun] = []
    for run in runs:
        last = merged[-1] if merged else None
        if last is not None and last.host + last.blocks == run.host and last.staging + last.blocks == run.staging:
            merged[-1] = CopyRun(last.host, last.staging, last.blocks + run.blocks)
        else:
            merged.append(run)
    return tuple(merged)


def attended_blocks(stored: int, window: int | None, block_size: int) -> tuple[int, int]:
    """[first, end) of the stored blocks a step reads for a layer holding `stored` rows (the new
    row, written on the device, is not among them; a sliding window skips blocks before it)."""
    first = max(0, stored + 1 - window) // block_size if window is not None else 0
    return first, math.ceil(stored / block_size)


def sequence_copies(owned: Sequence[int], stored: Sequence[int], windows: Sequence[int | None], base: int,
                    span: int, block_size: int) -> list[list[CopyRun]]:
    """Per offloaded layer, the runs copying one sequence's attended blocks; its block j goes to
    staging block base + j (j < span)."""
    runs = block_runs(owned[:span])
    per_layer = []
    for rows, window in zip(stored, windows):
        first, end = attended_blocks(rows, window, block_size)
        layer_runs = []
        for start, block, length in runs:
            lo, hi = max(start, first), min(start + length, end)  # this run's part of [first, end)
            if lo < hi:
                layer_runs.append(CopyRun(block + lo - start, base + lo, hi - lo))
        per_layer.append(layer_runs)
    return per_layer


# -- the side stream -----------------------------------------------------------------------
class LayerCopies:
    """The prefetch side stream and, per staging buffer, a `ready` event (its fill finished) and a
    `free` event (the layer reading it finished). Every method is a no-op off CUDA, where copies
    are synchronous."""

    def __init__(self, device: torch.device, buffers: int = STAGING_BUFFERS) -> None:
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.ready = [torch.cuda.Event() for _ in range(buffers)] if cuda else []
        self.free = [torch.cuda.Event() for _ in range(buffers)] if cuda else []

    def begin_step(self) -> None:
        """Order the side stream after everything queued so far (the step's plan tensors, buffer setup)."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))

    @contextlib.contextmanager
    def filling(self, buffer: int) -> Iterator[None]:
        """Copies issued inside run on the side stream after `buffer` is free, then mark it ready."""
        if self.stream is None:
            yield
            return
        self.stream.wait_event(self.free[buffer])
        with torch.cuda.stream(self.stream):
            yield
        self.ready[buffer].record(self.stream)

    def wait_ready(self, buffer: int) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self.ready[buffer])

    def mark_free(self, buffer: int) -> None:
        if self.stream is not None:
            self.free[buffer].record(torch.cuda.current_stream(self.stream.device))

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


# -- the cache ---------------------------------------------------------------------------------
class OffloadedKVCache(PagedKVCache):
    """`PagedKVCache` (same allocator, tables, counters and host-side API) with the KV of layers
    >= `gpu_layers` in host pools `host_keys` / `host_values` ([L_off, num_blocks, H_kv, bs, D],
    pinned when the device is CUDA). `keys[l]` / `values[l]` is the device pool layer l attends:
    the GPU pool for l < gpu_layers, else staging buffer (l - gpu_layers) % 2, whose block numbers
    are those of the step's `StagingPlan`. At most `staging_blocks` blocks may be reserved at once
    (a running batch always fits one staging buffer)."""

    def __init__(self, shape: PagedKVShape, dtype: torch.dtype, device: torch.device | str, *, gpu_layers: int,
                 staging_blocks: int) -> None:
        """Raises ValueError for gpu_layers outside [0, L] or an empty staging buffer, RuntimeError when
        the host pools cannot be page-locked."""
        if not 0 <= gpu_layers <= shape.num_layers:
            raise ValueError(f"gpu_layers must be in [0, {shape.num_layers}] (got {gpu_layers})")
        offloaded = shape.num_layers - gpu_layers
        if offloaded and staging_blocks < 1:
            raise ValueError(f"the staging buffer needs at least one block (got {staging_blocks})")
        # the base class allocates device pools for the layers it is given: only the GPU-resident ones
        super().__init__(dataclasses.replace(shape, num_layers=gpu_layers), dtype, device)
        self.shape, self.gpu_layers, self.num_offloaded = shape, gpu_layers, offloaded
        self.stored = torch.zeros((shape.max_rows + 1, shape.num_layers), dtype=torch.int64, device=self.device)
        self.staging_blocks = staging_blocks if offloaded else 0
        self._allocate_offload_buffers()
        self.keys = self.keys + [self._stage_keys[k % STAGING_BUFFERS] for k in range(offloaded)]
        self.values = self.values + [self._stage_values[k % STAGING_BUFFERS] for k in range(offloaded)]
        self.copies = LayerCopies(self.device)

    def _allocate_offload_buffers(self) -> None:
        s, offloaded = self.shape, self.num_offloaded
        pin = self.device.type == "cuda" and offloaded > 0
        host = (offloaded, s.num_blocks, s.num_kv_heads, s.block_size, s.head_dim)
        self._pinned: list[int] = []  # page-locked host pools, unlocked when this cache is collected
        weakref.finalize(self, unpin, self._pinned).atexit = False
        self.host_keys, self.host_values = (self._host_pool(host, pin) for _ in range(2))
        staging = (self.staging_blocks, s.num_kv_heads, s.block_size, s.head_dim)
        buffers = min(offloaded, STAGING_BUFFERS)
        self._stage_keys = [torch.zeros(staging, dtype=self.dtype, device=self.device) for _ in range(buffers)]
        self._stage_values = [torch.zeros(staging, dtype=self.dtype, device=self.device) for _ in range(buffers)]
        rows = (s.max_rows, 2, offloaded, s.num_kv_heads, s.head_dim)  # batch-major: a batch prefix is contiguous
        self._new_rows = torch.zeros(rows, dtype=self.dtype, device=self.device)
        self._new_rows_host = torch.zeros(rows, dtype=self.dtype, pin_memory=pin)

    def _host_pool(self, shape: tuple[int, ...], pin: bool) -> torch.Tensor:
        if not pin:
            return torch.zeros(shape, dtype=self.dtype)
        pool = pinned_zeros(shape, self.dtype)
        self._pinned.append(pool.data_ptr())
        return pool

    # -- host-side bookkeeping ---------------------------------------------------------------
    @property
    def used_blocks(self) -> int:
        return self.capacity_blocks - self.num_free_blocks

    def can_allocate(self, tokens: int) -> bool:
        """As `PagedKVCache.can_allocate`, and the reserved blocks, this one included, fit one
        staging buffer."""
        blocks = self.blocks_for(tokens)
        staged = not self.num_offloaded or self.used_blocks + blocks <= self.staging_blocks
        return staged and super().can_allocate(tokens)

    def fits_ever(self, tokens: int) -> bool:
        return super().fits_ever(tokens) and (not self.num_offloaded or self.blocks_for(tokens) <= self.staging_blocks)

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where layer `layer`'s KV lives between steps: its GPU pools or its host pools."""
        if layer < self.gpu_layers:
            return self.keys[layer], self.values[layer]
        return self.host_keys[layer - self.gpu_layers], self.host_values[layer - self.gpu_layers]

    # -- loading and reading -------------------------------------------------------------------
    def load(self, row: int, layers: list[torch.Tensor], length: int) -> None:
        """As `PagedKVCache.load` (synchronous; the inputs are not kept); offloaded layers are
        written to the host pools. Raises ValueError unless there is one tensor per layer."""
        if len(layers) != self.shape.num_layers:
            raise ValueError(f"{len(layers)} KV layers for a {self.shape.num_layers}-layer cache")
        self.copies.synchronize()  # no prefetch still reads the host pools (a failed step may leave one)
        owned = self._row_blocks[row]
        for layer, tensor in enumerate(layers):
            for pool, part in zip(self.pools(layer), tensor):
                store_rows(pool, part, owned, self.shape.block_size)
        self.stored[row] = torch.tensor([t.shape[2] for t in layers], dtype=torch.int64)
        self.lengths[row] = length

    def layer_rows(self, row: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored K and V of one sequence's layer from where it lives (GPU or host), [H_kv, n, D]."""
        n = int(self.stored[row, layer])
        ids = torch.tensor(self._row_blocks[row][: self.blocks_for(n)], dtype=torch.int64)
        return tuple(gather_rows(pool, ids.to(pool.device), n) for pool in self.pools(layer))

    # -- one step --------------------------------------------------------------------------------
    def plan_step(self, rows: torch.Tensor, slots: StepSlots, windows: Sequence[int | None]) -> StagingPlan:
        """The staging of one step over `rows` (distinct allocated rows, no padding; their `slots`
        from `step_slots`); `windows`:
        each layer's sliding window (None: full attention). Synchronises once with the device (it
        reads the batch's stored counts); mutates nothing. Raises RuntimeError when the batch does
        not fit a staging buffer (admission prevents it)."""
        g, bs = self.gpu_layers, self.shape.block_size
        snapshot = torch.cat([rows[:, None], self.stored[rows, g:]], dim=1).cpu().tolist()
        copies: list[list[CopyRun]] = [[] for _ in range(self.num_offloaded)]
        bases, spans, staged, host_blocks, offsets, base = [], [], [], [], [], 0
        for row, *stored in snapshot:
            owned, span = self._row_blocks[row], self.blocks_for(max(stored, default=0) + 1)
            for layer_runs, runs in zip(copies, sequence_copies(owned, stored, windows[g:], base, span, bs)):
                layer_runs.extend(runs)
            staged.append([base + n // bs for n in stored])
            host_blocks.append([owned[n // bs] for n in stored])
            offsets.append([n % bs for n in stored])
            bases.append(base)
            spans.append(span)
            base += span
        if base > self.staging_blocks:
            raise RuntimeError(f"a step needs {base} staging blocks; the buffer has {self.staging_blocks}")
        runs = tuple(merge_runs(layer_runs) for layer_runs in copies)
        block_bytes = 2 * self.host_keys[0, 0].nbytes if self.num_offloaded else 0
        shape = (len(snapshot), self.num_offloaded)
        return StagingPlan(self._staged_slots(slots, staged, bases, spans), runs,
                           torch.tensor(host_blocks, dtype=torch.int64).view(shape),
                           torch.tensor(offsets, dtype=torch.int64).view(shape),
                           block_bytes * sum(run.blocks for layer in runs for run in layer))

    def _staged_slots(self, slots: StepSlots, staged: list[list[int]], bases: list[int], spans: list[int]
                      ) -> StepSlots:
        """`slots` with offloaded layers' slot blocks and the block tables renumbered into staging
        (sequence block j -> base + j; table entries past its span point at its first block)."""
        device, g = self.device, self.gpu_layers
        new = torch.tensor(staged, dtype=slots.slot_blocks.dtype).view(len(staged), self.num_offloaded)
        slot_blocks = torch.cat([slots.slot_blocks[:, :g], new.to(device, non_blocking=True)], dim=1)
        base = torch.tensor(bases, dtype=torch.int32).to(device, non_blocking=True)[:, None]
        span = torch.tensor(spans, dtype=torch.int32).to(device, non_blocking=True)[:, None]
        cols = torch.arange(slots.block_tables.shape[1], dtype=torch.int32, device=device)[None]
        tables = torch.where(cols < span, base + cols, base)
        return dataclasses.replace(slots, slot_blocks=slot_blocks, block_tables=tables)

    def start_prefetch(self, plan: StagingPlan) -> None:
        """Begin a step: fill both staging buffers (the first two offloaded layers)."""
        self.copies.begin_step()
        for layer in range(self.gpu_layers, min(self.gpu_layers + STAGING_BUFFERS, self.shape.num_layers)):
            self.prefetch(layer, plan)

    def prefetch(self, layer: int, plan: StagingPlan) -> None:
        """Queue the copies of offloaded `layer`'s planned blocks into its staging buffer on the side
        stream, after the buffer's previous reader finished; returns at once on CUDA."""
        k = layer - self.gpu_layers
        buffer = k % STAGING_BUFFERS
        keys, values = self._stage_keys[buffer], self._stage_values[buffer]
        with self.copies.filling(buffer):
            for host, staging, blocks in plan.copies[k]:
                keys[staging: staging + blocks].copy_(self.host_keys[k, host: host + blocks], non_blocking=True)
                values[staging: staging + blocks].copy_(self.host_values[k, host: host + blocks], non_blocking=True)

    def wait_staged(self, layer: int) -> None:
        """Make the compute stream wait for offloaded `layer`'s staging copies."""
        self.copies.wait_ready((layer - self.gpu_layers) % STAGING_BUFFERS)

    def release(self, layer: int, plan: StagingPlan) -> None:
        """After offloaded `layer` attended: keep its new rows for the write-back and hand its staging
        buffer to the next fill (prefetch layer + 2 after this)."""
        k = layer - self.gpu_layers
        buffer, batch = k % STAGING_BUFFERS, plan.batch
        blocks, offsets = plan.slots.slot_blocks[:, layer].long(), plan.slots.slot_offsets[:, layer].long()
        self._new_rows[:batch, 0, k] = self._stage_keys[buffer][blocks, :, offsets]
        self._new_rows[:batch, 1, k] = self._stage_values[buffer][blocks, :, offsets]
        self.copies.mark_free(buffer)

    def start_write_back(self, plan: StagingPlan) -> PendingWriteBack:
        """Queue the copy of every offloaded layer's new rows to pinned host memory (on the compute
        stream, after the last offloaded layer's `release`)."""
        batch = plan.batch
        self._new_rows_host[:batch].copy_(self._new_rows[:batch], non_blocking=True)
        if self.device.type != "cuda":
            return PendingWriteBack(plan, None)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(self.device))
        return PendingWriteBack(plan, copied)

    def finish_write_back(self, pending: PendingWriteBack) -> None:
        """Wait for the copy, then scatter the new rows into the host pools (CPU index_put). Every
        staging copy of the step finished before it (compute waited for each), so no host -> device
        copy reads the pools while they change."""
        if pending.copied is not None:
            pending.copied.synchronize()
        plan = pending.plan
        rows = self._new_rows_host[: plan.batch]  # [B, 2, L_off, H_kv, D]
        layers = torch.arange(self.num_offloaded)[None].expand(plan.batch, -1)
        self.host_keys[layers, plan.host_blocks, :, plan.host_offsets] = rows[:, 0]
        self.host_values[layers, plan.host_blocks, :, plan.host_offsets] = rows[:, 1]


# -- block layout helpers ----------------------------------------------------------------------
def store_rows(pool: torch.Tensor, part: torch.Tensor, owned: Sequence[int], block_size: int) -> None:
    """Write part [H_kv, n, D] as rows [0, n) of the blocks `owned` of `pool` ([blocks, H_kv, bs, D],
    any device); one copy per run of consecutive blocks; synchronous."""
    rows = part.shape[1]
    full, rest = divmod(rows, block_size)
    for start, block, length in block_runs(owned[:full]):
        src = part[:, start * block_size: (start + length) * block_size]
        pool[block: block + length].copy_(src.unflatten(1, (length, block_size)).transpose(0, 1))
    if rest:
        pool[owned[full], :, :rest].copy_(part[:, full * block_size:])


def gather_rows(pool: torch.Tensor, ids: torch.Tensor, rows: int) -> torch.Tensor:
    """Rows [0, rows) of the blocks `ids` of `pool`, contiguous [H_kv, rows, D]."""
    blocks = pool[ids]  # [n, H_kv, bs, D]
    return blocks.transpose(0, 1).reshape(pool.shape[1], -1, pool.shape[3])[:, :rows]
