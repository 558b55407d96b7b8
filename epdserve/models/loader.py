"""Build the stage models from a checkpoint directory with strict weight loading.

`load_decoder` is what prefill and decode use; `load_vision_encoder` is what encode uses.
Each reads only its own component's tensors.
"""

from __future__ import annotations

import json
import pathlib

import torch

from epdserve.errors import ModelLoadError
from epdserve.models.checkpoint import Checkpoint, align_prefix, load_strict, unfuse_moe_experts
from epdserve.models.decoder import Decoder
from epdserve.models.layers import RotaryEmbedding
from epdserve.models.spec import LlavaSpec, load_spec
from epdserve.models.vision import VisionEncoder

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, stored: torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' = the stored dtype on GPU, float32 on CPU (half-precision matmuls are slow there)."""
    if dtype == "auto":
        return stored if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {['auto', *_DTYPES]}")
    return _DTYPES[dtype]


def load_decoder(
    spec_or_dir: LlavaSpec | str | pathlib.Path, *, dtype: str = "auto", device: str = "auto"
) -> Decoder:
    spec, ckpt, dev, torch_dtype = _prepare(spec_or_dir, dtype, device)
    rope = RotaryEmbedding.from_hf_config(spec.hf_config.text_config, spec.decoder.head_dim, spec.decoder.rope_type)
    with torch.device("meta"):
        decoder = Decoder(spec.decoder, rope.to(dev))
    tensors = _read(ckpt, "decoder", unfuse_moe_experts)
    if spec.decoder.tie_word_embeddings and "lm_head.weight" not in tensors and "embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    load_strict(decoder, tensors, "decoder", dtype=torch_dtype, device=dev)
    if spec.decoder.tie_word_embeddings:
        decoder.lm_head.weight = decoder.embed_tokens.weight
    return decoder.eval()


def load_vision_encoder(
    spec_or_dir: LlavaSpec | str | pathlib.Path, *, dtype: str = "auto", device: str = "auto"
) -> VisionEncoder:
    spec, ckpt, dev, torch_dtype = _prepare(spec_or_dir, dtype, device)
    encoder = VisionEncoder(spec)
    tower = encoder.vision_tower
    tensors = align_prefix(_read(ckpt, "vision"), tower.state_dict().keys(), "vision_model.")
    load_strict(tower, tensors, "vision tower", dtype=torch_dtype, device=dev)
    load_strict(encoder.multi_modal_projector, _read(ckpt, "projector"), "projector", dtype=torch_dtype, device=dev)
    return encoder.to(dev).eval()


def _prepare(spec_or_dir: LlavaSpec | str | pathlib.Path, dtype: str, device: str):
    """(spec, checkpoint index, device, dtype) for loading one component."""
    spec = spec_or_dir if isinstance(spec_or_dir, LlavaSpec) else load_spec(spec_or_dir)
    ckpt = _checkpoint(spec.model_dir)
    dev = resolve_device(device)
    return spec, ckpt, dev, resolve_dtype(dtype, ckpt.stored_dtype(), dev)


def _checkpoint(model_dir: pathlib.Path) -> Checkpoint:
    try:
        return Checkpoint(model_dir)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read weights in {model_dir}: {exc}") from exc


def _read(ckpt: Checkpoint, component: str, hook=None) -> dict[str, torch.Tensor]:
    try:
        tensors = ckpt.read(component)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ModelLoadError(f"cannot read {component} weights in {ckpt.model_dir}: {exc}") from exc
    return hook(tensors) if hook else tensors
