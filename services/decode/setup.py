"""Build the decode engine for a loaded model: size the paged KV cache from the config."""

from __future__ import annotations

import torch

from epdserve.config import DecodeConfig
from epdserve.engine.paged_kv import PagedKVCache, PagedKVShape
from epdserve.errors import ModelLoadError
from epdserve.models.decoder import Decoder
from epdserve.models.spec import LlavaSpec
from services.decode.engine import DecodeEngine
from services.decode.local_prefill import LocalPrefill
from services.decode.runner import BatchRunner
from services.decode.text_sparsify import TextKeepScorer, TextSparsifyConfig, build_scorer
from services.prefill.prefill import PromptPrefiller

CPU_AUTO_KV_BYTES = 256 << 20


def kv_budget_bytes(config: DecodeConfig, device: torch.device) -> int:
    """The KV cache's size: the configured GiB, else --kv-cache-fraction of the GPU's free memory
    (256 MiB on CPU)."""
    if config.kv_cache_gib > 0:
        return int(config.kv_cache_gib * (1 << 30))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * config.kv_cache_fraction)
    return CPU_AUTO_KV_BYTES


def kv_shape(decoder: Decoder, config: DecodeConfig) -> PagedKVShape:
    spec = decoder.spec
    probe = PagedKVShape(spec.num_layers, spec.num_kv_heads, spec.head_dim, config.block_size, 0,
                         config.max_running, -(-config.max_context // config.block_size))
    num_blocks = kv_budget_bytes(config, decoder.device) // probe.bytes_per_block(decoder.dtype)
    if num_blocks < 2:
        block = probe.bytes_per_block(decoder.dtype)
        raise ModelLoadError(f"the KV cache budget holds fewer than 2 blocks of {block} bytes (raise --kv-cache-gib)")
    return PagedKVShape(spec.num_layers, spec.num_kv_heads, spec.head_dim, config.block_size, num_blocks,
                        config.max_running, probe.max_blocks_per_row)


def text_scorer(decoder: Decoder, config: DecodeConfig) -> tuple[TextKeepScorer | None, int]:
    """Generated-token sparsification's scorer (None when off) and the layer it applies from."""
    sparsify = TextSparsifyConfig(keep_rate=config.text_keep_rate, layer=config.text_sparsify_layer,
                                  scorer=config.text_scorer, predictor_path=config.text_predictor)
    spec = decoder.spec
    return build_scorer(sparsify, spec.num_layers, spec.hidden_size, decoder.device, decoder.dtype), sparsify.layer


def local_prefill(decoder: Decoder, config: DecodeConfig, spec: LlavaSpec | None) -> LocalPrefill | None:
    """The engine's local prefill (E -> PD) when the checkpoint's spec is known and it is enabled."""
    if spec is None or not config.local_prefill:
        return None
    return LocalPrefill(PromptPrefiller(spec, decoder), config.insertion_policy, config.max_running)


def build_runner(decoder: Decoder, kv: PagedKVCache, config: DecodeConfig):
    """CUDA-graphed steps for dense models on CUDA when enabled, else eager steps."""
    runner = BatchRunner(decoder, kv, *text_scorer(decoder, config))
    if config.cuda_graphs and decoder.device.type == "cuda" and decoder.spec.moe is None:
        from services.decode.graphs import CudaGraphRunner

        return CudaGraphRunner(runner, config.max_running)
    return runner


def place_experts(decoder: Decoder, config: DecodeConfig):
    """MoE expert offloading (ProMoE) when configured: moves the decoder's experts to pinned host
    memory behind a GPU expert cache, in place, and returns the started ExpertOffloader (the caller
    closes it after the engine's last step); None when off. Raises ModelLoadError for a dense model
    or a budget below one expert per layer."""
    if not config.expert_offload:
        return None
    from epdserve.engine.expert_offload import ExpertOffloadConfig, offload_experts

    if decoder.spec.moe is None:
        raise ModelLoadError("--expert-cache-rate / --expert-cache-gib need a Mixtral-style MoE checkpoint")
    predictor = {"skip-gate": "skip_gate", "learned": "learned"}.get(config.expert_prefetch, "none")
    try:
        offload = ExpertOffloadConfig(
            cache_rate=None if config.expert_cache_gib else config.expert_cache_rate,
            cache_bytes=max(1, int(config.expert_cache_gib * (1 << 30))) if config.expert_cache_gib else None,
            prefetch_distance=config.expert_prefetch_distance, predictor=predictor,
            predictor_path=config.expert_predictor or None, enable_prefetch=config.expert_prefetch != "on-demand")
        return offload_experts(decoder, offload)
    except ValueError as exc:
        raise ModelLoadError(f"expert offloading: {exc}") from None


def build_engine(decoder: Decoder, config: DecodeConfig, spec: LlavaSpec | None = None) -> DecodeEngine:
    """With the checkpoint's `spec` and local prefill enabled, the engine also prefills prompts;
    with host_kv_gib > 0 the KV of layers past gpu_kv_layers lives in pinned host memory."""
    if config.host_kv_gib > 0:
        from services.decode.offload_runner import build_offloaded_engine  # lazy: offload_runner imports setup

        return build_offloaded_engine(decoder, config, gpu_layers=config.gpu_kv_layers, host_kv_gib=config.host_kv_gib,
                                      staging_tokens=config.staging_tokens or config.max_context, spec=spec)
    kv = PagedKVCache(kv_shape(decoder, config), decoder.dtype, decoder.device)
    return DecodeEngine(build_runner(decoder, kv, config), local_prefill(decoder, config, spec))
