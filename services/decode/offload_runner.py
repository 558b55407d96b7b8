"""Decode steps over an `OffloadedKVCache`: GPU-resident layers as in `BatchRunner`, offloaded
layers attend a staging copy prefetched one layer ahead on a side stream.

Invariant: `run` computes exactly what `BatchRunner.run` computes (same layer pieces, same order,
same rows attended), so the token streams equal the all-on-GPU engine's; only where the KV of
layers >= gpu_layers is read from differs. Per offloaded layer k the compute stream waits for
k's staging copy, attends, collects the new row and frees the buffer; the side stream then fills
it for layer k + 2. No CUDA graphs in this mode (the copies depend on each step's plan).
"""

from __future__ import annotations

import functools
import math

import torch

from epdserve.config import DecodeConfig
from epdserve.engine.offloaded_kv import STAGING_BUFFERS, OffloadedKVCache, StagingPlan
from epdserve.engine.paged_kv import PagedKVShape, StepSlots
from epdserve.errors import ModelLoadError
from epdserve.models.decoder import Decoder
from epdserve.models.layers import DecoderLayer
from epdserve.models.spec import LlavaSpec
from services.decode.engine import DecodeEngine
from services.decode.runner import BatchRunner
from services.decode.setup import kv_budget_bytes, local_prefill, text_scorer
from services.decode.text_sparsify import TextKeepScorer

GIB = 1 << 30


class OffloadedBatchRunner(BatchRunner):
    """Same contract as `BatchRunner.run`. `copied_bytes` counts host -> device KV bytes staged so far."""

    def __init__(self, decoder: Decoder, kv: OffloadedKVCache, text_keep: TextKeepScorer | None = None,
                 text_keep_layer: int = 0) -> None:
        super().__init__(decoder, kv, text_keep, text_keep_layer)
        self.kv: OffloadedKVCache = kv
        self.windows = tuple(layer.self_attn.window for layer in decoder.layers)
        self.copied_bytes = 0

    @torch.inference_mode()
    def run(self, rows: torch.Tensor, tokens: torch.Tensor, max_kv_rows: int) -> torch.Tensor:
        """As `BatchRunner.run`; returns once the step's new offloaded rows are in the host pools
        (the logits may still be computing)."""
        slots = self.kv.step_slots(rows, self.kv.blocks_for(max_kv_rows))
        plan = self.kv.plan_step(rows, slots, self.windows) if self.kv.num_offloaded else None
        if plan is not None:
            self.kv.start_prefetch(plan)
        attend = functools.partial(self._layer_attention, slots=slots, plan=plan)
        h, keep = self._forward(rows, tokens, slots, attend)
        pending = self.kv.start_write_back(plan) if plan is not None else None
        self.kv.advance(rows, keep, self.text_keep_layer)
        logits = self.decoder.logits(h[:, 0])
        if pending is not None:
            self.kv.finish_write_back(pending)  # overlaps the LM head on the device
            self.copied_bytes += plan.copy_bytes
        return logits

    def _layer_attention(self, layer: DecoderLayer, index: int, h: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, slots: StepSlots, plan: StagingPlan | None) -> torch.Tensor:
        """`BatchRunner._attention` against the GPU pools, or, for an offloaded layer, against its
        staging buffer (`kv.keys[index]`) with the plan's renumbered slots."""
        if index < self.kv.gpu_layers:
            return self._attention(layer, index, h, cos, sin, slots)
        self.kv.wait_staged(index)
        out = self._attention(layer, index, h, cos, sin, plan.slots)
        self.kv.release(index, plan)
        if index + STAGING_BUFFERS < len(self.decoder.layers):
            self.kv.prefetch(index + STAGING_BUFFERS, plan)
        return out


def offloaded_kv_shape(decoder: Decoder, config: DecodeConfig, gpu_layers: int, host_kv_gib: float,
                       staging_blocks: int) -> PagedKVShape:
    """Blocks: as many as both the GPU budget (GPU-resident layers' pools, after the staging buffers)
    and the host budget (offloaded layers' pools) hold. Raises ModelLoadError when fewer than 2."""
    spec = decoder.spec
    table = math.ceil(config.max_context / config.block_size)
    probe = PagedKVShape(1, spec.num_kv_heads, spec.head_dim, config.block_size, 0, config.max_running, table)
    layer_block = probe.bytes_per_block(decoder.dtype)  # K and V of one layer
    offloaded = spec.num_layers - gpu_layers
    limits = []
    if gpu_layers:
        staging = STAGING_BUFFERS * staging_blocks * layer_block if offloaded else 0
        limits.append((kv_budget_bytes(config, decoder.device) - staging) // (gpu_layers * layer_block))
    if offloaded:
        limits.append(int(host_kv_gib * GIB) // (offloaded * layer_block))
    if min(limits) < 2:
        raise ModelLoadError(f"the KV budgets hold {min(limits)} blocks of {layer_block} bytes per layer (GPU "
                             f"{kv_budget_bytes(config, decoder.device) / GIB:.2f} GiB for {gpu_layers} layers, host "
                             f"{host_kv_gib} GiB for {offloaded}); at least 2 are needed")
    return PagedKVShape(spec.num_layers, spec.num_kv_heads, spec.head_dim, config.block_size, min(limits),
                        config.max_running, table)


def build_offloaded_engine(decoder: Decoder, config: DecodeConfig, *, gpu_layers: int, host_kv_gib: float,
                           staging_tokens: int, spec: LlavaSpec | None = None) -> DecodeEngine:
    """A decode engine whose layers >= gpu_layers keep their KV in `host_kv_gib` GiB of pinned host
    memory, staged through two GPU buffers of `staging_tokens` rows each (the most rows all running
    sequences may reserve together). `spec`: as in `setup.build_engine` (local prefill). Raises
    ValueError for contradictory settings, ModelLoadError when the budgets hold too little."""
    layers = decoder.spec.num_layers
    if not 0 <= gpu_layers <= layers:
        raise ValueError(f"gpu_layers must be in [0, {layers}] (got {gpu_layers})")
    if gpu_layers < layers and staging_tokens < config.max_context:
        raise ValueError(f"staging_tokens ({staging_tokens}) must be >= max_context ({config.max_context}): "
                         f"a running sequence's KV must fit the staging buffer")
    staging_blocks = math.ceil(staging_tokens / config.block_size)
    shape = offloaded_kv_shape(decoder, config, gpu_layers, host_kv_gib, staging_blocks)
    kv = OffloadedKVCache(shape, decoder.dtype, decoder.device, gpu_layers=gpu_layers, staging_blocks=staging_blocks)
    scorer, scorer_layer = text_scorer(decoder, config)
    return DecodeEngine(OffloadedBatchRunner(decoder, kv, scorer, scorer_layer), local_prefill(decoder, config, spec))
