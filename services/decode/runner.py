"""The decode model runner: one token for each of B sequences against the paged KV.

Invariant: `run(rows, tokens)` appends `tokens[i]` at logical position `lengths[rows[i]]` of
sequence row `rows[i]` (RoPE at that position), writes its K/V as the next stored row of every
layer, attends over exactly that sequence's stored rows, advances the row's counters once, and
returns the next-token logits [B, V]. Rows of one call are distinct (except the padding row).
With generated-token sparsification, layers from `text_keep_layer` on keep the row only when
the scorer says so (text_sparsify.py). The math per sequence is
the single-sequence decode step's (same layers, same order); only the batching differs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from epdserve.engine.paged_attention import paged_decode_attention, write_decode_kv
from epdserve.engine.paged_kv import PagedKVCache, StepSlots
from epdserve.models.decoder import Decoder
from epdserve.models.layers import DecoderLayer
from services.decode.text_sparsify import TextKeepScorer

Attend = Callable[[DecoderLayer, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class BatchRunner:
    def __init__(self, decoder: Decoder, kv: PagedKVCache, text_keep: TextKeepScorer | None = None,
                 text_keep_layer: int = 0) -> None:
        """`text_keep`: generated-token sparsification from `text_keep_layer` on (None: keep all)."""
        self.decoder, self.kv = decoder, kv
        self.text_keep, self.text_keep_layer = text_keep, text_keep_layer

    @torch.inference_mode()
    def run(self, rows: torch.Tensor, tokens: torch.Tensor, max_kv_rows: int) -> torch.Tensor:
        """rows, tokens: int64 [B] on the model's device; no sequence attends more than
        `max_kv_rows` rows this step. Returns float logits [B, V]."""
        slots = self.kv.step_slots(rows, self.kv.blocks_for(max_kv_rows))
        h, keep = self._forward(rows, tokens, slots, functools.partial(self._attention, slots=slots))
        self.kv.advance(rows, keep, self.text_keep_layer)
        return self.decoder.logits(h[:, 0])

    def _forward(self, rows: torch.Tensor, tokens: torch.Tensor, slots: StepSlots, attend: Attend
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every layer for one new token per sequence; `attend(layer, index, h, cos, sin)` is the
        attention block's update. Returns the last hidden states [B, 1, d] and the keep decisions
        of generated-token sparsification (None when off)."""
        cos, sin = self.decoder.cos_sin(slots.positions)
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]  # [B, 1, 1, D]: one position per sequence
        h = self.decoder.embed(tokens[:, None])  # [B, 1, d]
        keep = None
        for index, layer in enumerate(self.decoder.layers):
            if self.text_keep is not None and index == self.text_keep_layer:
                keep = self.text_keep.keep(h[:, 0], rows != self.kv.padding_row)
            h = h + attend(layer, index, h, cos, sin)
            h = layer.feed_forward_block(h)
        return h, keep

    def _attention(self, layer: DecoderLayer, index: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   slots: StepSlots) -> torch.Tensor:
        attn = layer.self_attn
        q, k, v = attn.project(layer.input_layernorm(h), cos, sin)  # q [B, H, 1, D], k/v [B, H_kv, 1, D]
        keys, values = self.kv.keys[index], self.kv.values[index]
        write_decode_kv(keys, values, k[:, :, 0], v[:, :, 0], slots.slot_blocks[:, index], slots.slot_offsets[:, index])
        out = paged_decode_attention(q[:, :, 0], keys, values, slots.block_tables, slots.seq_lens[:, index],
                                     window=attn.window)
        return attn.output(out[:, :, None])
