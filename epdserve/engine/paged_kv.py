"""Paged KV storage for many sequences decoding together (the decode service's KV block manager).

Invariant: a sequence occupies one row r of the block tables from `allocate` to `free`; the
blocks in `tables[r, :blocks_of(r)]` belong to it alone and hold enough rows for its whole
reservation (stored rows + every token it may still generate), so a running sequence never
needs a block it does not already own. For every layer l, KV rows [0, stored[r, l]) of the
sequence are valid and row j lives at `keys[l][tables[r, j // block_size], :, j % block_size]`;
`lengths[r]` is the logical length (the next token's position), >= stored[r, l] (FastKV and
sparsified prompts store fewer rows than positions). Freed blocks and rows are reusable at once.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class PagedKVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    max_rows: int            # sequences that can hold KV at once
    max_blocks_per_row: int  # table width: the longest reservation, in blocks

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_dim * element

    @property
    def max_tokens_per_row(self) -> int:
        return self.max_blocks_per_row * self.block_size


@dataclasses.dataclass(frozen=True)
class StepSlots:
    """Device tensors for one decode step over sequence rows `rows` (all [B] or [B, L])."""

    positions: torch.Tensor    # [B] logical position of the token being appended
    slot_blocks: torch.Tensor  # [B, L] block receiving the new row, per layer
    slot_offsets: torch.Tensor  # [B, L] offset of the new row inside that block
    seq_lens: torch.Tensor     # [B, L] rows to attend per layer, the new one included
    block_tables: torch.Tensor  # [B, max_blocks_per_row]


class PagedKVCache:
    """Block pools per layer (`keys[l]`, `values[l]`: [num_blocks, H_kv, block_size, D]) plus
    per-row block tables and counters, all on `device`. Bookkeeping (free lists) lives on the host;
    nothing here synchronises with the device except `load`."""

    def __init__(self, shape: PagedKVShape, dtype: torch.dtype, device: torch.device | str) -> None:
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        pool = (shape.num_blocks, shape.num_kv_heads, shape.block_size, shape.head_dim)
        # zero-filled: rows past a sequence's length are masked, and 0 * uninitialised NaN would still be NaN
        self.keys = [torch.zeros(pool, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.values = [torch.zeros(pool, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        if shape.num_blocks < 2:
            raise ValueError("a paged KV cache needs at least 2 blocks (one is the padding row's scratch block)")
        rows = shape.max_rows + 1  # the last row pads fixed-size (CUDA graph) batches
        self.tables = torch.zeros((rows, shape.max_blocks_per_row), dtype=torch.int32, device=device)
        self.stored = torch.zeros((rows, shape.num_layers), dtype=torch.int64, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.int64, device=device)
        self.padding_row = shape.max_rows
        self.tables[self.padding_row] = shape.num_blocks - 1  # every entry: the scratch block
        self._free_blocks = list(range(shape.num_blocks - 2, -1, -1))
        self._free_rows = list(range(shape.max_rows - 1, -1, -1))
        self._row_blocks: dict[int, list[int]] = {}

    # -- host-side bookkeeping ---------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.shape.block_size)

    def can_allocate(self, tokens: int) -> bool:
        """Whether a reservation of `tokens` rows fits now (a free row and enough free blocks)."""
        return bool(self._free_rows) and self.blocks_for(tokens) <= len(self._free_blocks)

    def fits_ever(self, tokens: int) -> bool:
        """Whether a reservation of `tokens` rows could fit in an empty cache."""
        blocks = self.blocks_for(tokens)
        return blocks <= self.shape.max_blocks_per_row and blocks <= self.capacity_blocks

    @property
    def capacity_blocks(self) -> int:
        """Blocks sequences can own (all but the padding row's scratch block)."""
        return self.shape.num_blocks - 1

    def allocate(self, tokens: int) -> int:
        """Reserve blocks for `tokens` rows; returns the sequence's row. Raises ValueError when it
        does not fit now (check `can_allocate` first)."""
        blocks = self.blocks_for(tokens)
        if not self.can_allocate(tokens) or blocks > self.shape.max_blocks_per_row:
            raise ValueError(f"cannot reserve {tokens} KV rows ({blocks} blocks; {self.num_free_blocks} free)")
        row = self._free_rows.pop()
        owned = [self._free_blocks.pop() for _ in range(blocks)]
        self._row_blocks[row] = owned
        self.tables[row, :blocks] = torch.tensor(owned, dtype=torch.int32).to(self.device, non_blocking=True)
        return row

    def free(self, row: int) -> None:
        """Return the row and its blocks (idempotent for a row that is not allocated)."""
        owned = self._row_blocks.pop(row, None)
        if owned is None:
            return
        self._free_blocks.extend(reversed(owned))
        self._free_rows.append(row)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_used_rows(self) -> int:
        return len(self._row_blocks)

    # -- device-side data --------------------------------------------------------------------
    def load(self, row: int, layers: list[torch.Tensor], length: int) -> None:
        """Copy a published prompt KV (per layer [2, H_kv, n_l, D], K then V) into the row's blocks
        and set its counters; `length` is the logical length (>= every n_l)."""
        bs, owned = self.shape.block_size, self._row_blocks[row]
        for layer, tensor in enumerate(layers):
            rows = tensor.shape[2]
            full, rest = divmod(rows, bs)
            ids = torch.tensor(owned[: full + (rest > 0)], device=self.device)
            kv = tensor.to(self.device, self.dtype)  # synchronous: the source may be a leased view
            for pool, part in ((self.keys[layer], kv[0]), (self.values[layer], kv[1])):
                if full:
                    blocked = part[:, : full * bs].reshape(part.shape[0], full, bs, part.shape[2]).transpose(0, 1)
                    pool.index_copy_(0, ids[:full], blocked)
                if rest:
                    pool[owned[full], :, :rest] = part[:, full * bs:]
        self.stored[row] = torch.tensor([t.shape[2] for t in layers], dtype=torch.int64)
        self.lengths[row] = length

    def step_slots(self, rows: torch.Tensor, table_width: int | None = None) -> StepSlots:
        """Where each sequence's new row goes, per layer, and how many rows it then attends; the
        block tables are cut to `table_width` blocks (enough for every row attended this step)."""
        stored = self.stored[rows]
        tables = self.tables[rows, :table_width]
        bs = self.shape.block_size
        return StepSlots(positions=self.lengths[rows], slot_blocks=tables.gather(1, (stored // bs).to(torch.int64)),
                         slot_offsets=stored % bs, seq_lens=(stored + 1).to(torch.int32), block_tables=tables)

    def advance(self, rows: torch.Tensor, keep: torch.Tensor | None = None, keep_from_layer: int = 0) -> None:
        """After a step wrote one row per layer for each of `rows` (the padding row, possibly many
        times, included: it is reset to empty, so padding only ever touches its scratch block).
        With `keep` (bool [B]), layers >= keep_from_layer keep the new row only where keep is set
        (a dropped row is overwritten by the next step); the logical length always advances."""
        if keep is None:
            self.stored[rows] += 1
        else:
            added = torch.ones_like(self.stored[rows])
            added[:, keep_from_layer:] = keep[:, None].to(added.dtype)
            self.stored[rows] += added
        self.lengths[rows] += 1
        self.stored[self.padding_row:].zero_()  # slices, not item writes: CUDA-graph capturable
        self.lengths[self.padding_row:].zero_()

    def layer_rows(self, row: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored K and V of one sequence's layer, contiguous [H_kv, n, D] each (tests, debugging)."""
        n = int(self.stored[row, layer])
        ids = self.tables[row, : self.blocks_for(n)].to(torch.int64)
        k = self.keys[layer][ids].transpose(0, 1).reshape(self.shape.num_kv_heads, -1, self.shape.head_dim)[:, :n]
        v = self.values[layer][ids].transpose(0, 1).reshape(self.shape.num_kv_heads, -1, self.shape.head_dim)[:, :n]
        return k, v
