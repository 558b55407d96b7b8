"""What a checkpoint is, as plain frozen data: parsed once from `config.json`.

The parsing goes through `transformers.AutoConfig` (so rope-scaling fields, defaults and
version differences are handled the way `transformers` handles them), then everything
the stages need is copied into frozen dataclasses. No weights are read here.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

from epdserve.errors import ModelLoadError

SUPPORTED_BACKBONES = ("llama", "mistral", "qwen2", "mixtral")
SUPPORTED_VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")
# RoPE variants whose frequencies do not depend on the running sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


@dataclasses.dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    backbone: str                    # llama | mistral | qwen2 | mixtral
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    max_context: int                 # max_position_embeddings
    attention_bias: bool             # bias on q/k/v projections
    output_bias: bool                # bias on o_proj
    mlp_bias: bool
    tie_word_embeddings: bool
    rope_type: str
    sliding_windows: tuple[int | None, ...]   # per layer; None = full attention
    moe: MoESpec | None
    eos_token_ids: tuple[int, ...]
    dtype: str                       # checkpoint dtype name, e.g. "float32", "bfloat16"

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    model_type: str                  # clip_vision_model | siglip_vision_model
    image_size: int
    patch_size: int
    has_cls_token: bool
    feature_layers: tuple[int, ...]  # hidden-state indices concatenated along features
    select_strategy: str             # "default" (drop the first token) | "full"

    @property
    def tokens_per_image(self) -> int:
        tokens = (self.image_size // self.patch_size) ** 2 + int(self.has_cls_token)
        return tokens - 1 if self.select_strategy == "default" else tokens


@dataclasses.dataclass(frozen=True)
class LlavaSpec:
    model_dir: pathlib.Path
    decoder: DecoderSpec
    vision: VisionSpec
    image_token_id: int
    hf_config: Any = dataclasses.field(repr=False, compare=False)  # the transformers config

    @property
    def tokens_per_image(self) -> int:
        return self.vision.tokens_per_image


def kept_tokens(tokens_per_image: int, keep_ratio: float) -> int:
    """Image tokens kept when the encode stage sparsifies at `keep_ratio`: floor(T * r), at least one.
    The router (placeholder count) and the encoder (tokens kept) both use this, so they agree."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1] (got {keep_ratio})")
    return max(1, math.floor(tokens_per_image * keep_ratio + 1e-9))


def load_spec(model_dir: str | pathlib.Path) -> LlavaSpec:
    """Parse a LLaVA checkpoint directory's config. Raises ModelLoadError naming what is wrong."""
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"model directory {model_dir} has no config.json")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"cannot parse {model_dir}/config.json: {exc}") from exc
    if config.model_type != "llava":
        raise ModelLoadError(f"model_type is {config.model_type!r}; epdserve serves 'llava' checkpoints")
    return LlavaSpec(
        model_dir=model_dir,
        decoder=_decoder_spec(config.text_config, _eos_ids(model_dir, config)),
        vision=_vision_spec(config),
        image_token_id=_image_token_id(config),
        hf_config=config,
    )


def _decoder_spec(text: Any, eos_token_ids: tuple[int, ...]) -> DecoderSpec:
    backbone = text.model_type
    if backbone not in SUPPORTED_BACKBONES:
        raise ModelLoadError(f"text_config.model_type {backbone!r} is not one of {SUPPORTED_BACKBONES}")
    rope_type = _rope_params(text).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ModelLoadError(f"text_config rope_type {rope_type!r} is not supported (supported: {STATIC_ROPE_TYPES})")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    moe = None
    if backbone == "mixtral":
        moe = MoESpec(num_experts=text.num_local_experts, top_k=text.num_experts_per_tok)
    attention_bias = backbone == "qwen2" or bool(getattr(text, "attention_bias", False))
    return DecoderSpec(
        backbone=backbone,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=text.rms_norm_eps,
        hidden_act=text.hidden_act,
        max_context=text.max_position_embeddings,
        attention_bias=attention_bias,
        output_bias=backbone != "qwen2" and bool(getattr(text, "attention_bias", False)),
        mlp_bias=bool(getattr(text, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        rope_type=rope_type,
        sliding_windows=_sliding_windows(text),
        moe=moe,
        eos_token_ids=eos_token_ids,
        dtype=_dtype_name(text),
    )


def _rope_params(text: Any) -> dict:
    params = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    return dict(params)


def _sliding_windows(text: Any) -> tuple[int | None, ...]:
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    if text.model_type == "qwen2" and not getattr(text, "use_sliding_window", False):
        window = None
    return tuple(window for _ in range(text.num_hidden_layers))


def _vision_spec(config: Any) -> VisionSpec:
    vision = config.vision_config
    if vision.model_type not in SUPPORTED_VISION_TOWERS:
        raise ModelLoadError(
            f"vision_config.model_type {vision.model_type!r} is not one of {SUPPORTED_VISION_TOWERS}"
        )
    layers = config.vision_feature_layer
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ModelLoadError(f"vision_feature_select_strategy {strategy!r} must be 'default' or 'full'")
    return VisionSpec(
        model_type=vision.model_type,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        has_cls_token=vision.model_type == "clip_vision_model",
        feature_layers=layers,
        select_strategy=strategy,
    )


def _image_token_id(config: Any) -> int:
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    if token_id is None:
        raise ModelLoadError("config.json has neither image_token_id nor image_token_index")
    return int(token_id)


def _eos_ids(model_dir: pathlib.Path, config: Any) -> tuple[int, ...]:
    from transformers import GenerationConfig

    eos = None
    if (model_dir / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    if eos is None:
        eos = getattr(config.text_config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _dtype_name(text: Any) -> str:
    dtype = getattr(text, "dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")
