"""Tiny random LLaVA checkpoints, built on disk from configs (no model hub).

A checkpoint written here is an ordinary `LlavaForConditionalGeneration` directory:
config.json, model.safetensors, generation_config.json, a byte-level BPE tokenizer with a
chat template, and a LLaVA processor (CLIP or SigLIP image processor). `transformers`
loads it with `from_pretrained`, and so does epdserve. Weights are seeded, so the same
arguments give the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import tempfile

BACKBONES = ("llama", "mistral", "qwen2", "mixtral")
VISION_TOWERS = ("clip", "siglip")
FORMAT_VERSION = "v1"  # bump when the layout below changes, so cached demo checkpoints are rebuilt

IMAGE_PLACEHOLDER = "<image>"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER)

# One user turn per message; image parts render as the placeholder on its own line.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class TinySpec:
    backbone: str = "llama"          # llama | mistral | qwen2 | mixtral
    vision: str = "clip"             # clip | siglip
    seed: int = 0
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_context: int = 2048
    image_size: int = 32
    patch_size: int = 8
    init_std: float = 0.05           # a little above HF's 0.02 so greedy choices are not near-ties
    feature_layers: tuple[int, ...] = (-2,)   # vision hidden states fed to the projector (concatenated)
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    rope_parameters: tuple[tuple[str, float | str], ...] = ()  # e.g. (("rope_type", "linear"), ("factor", 2.0))

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone {self.backbone!r} is not one of {BACKBONES}")
        if self.vision not in VISION_TOWERS:
            raise ValueError(f"vision {self.vision!r} is not one of {VISION_TOWERS}")


def build_tiny_checkpoint(out_dir: str | pathlib.Path, spec: TinySpec = TinySpec()) -> pathlib.Path:
    """Write a tiny random checkpoint to `out_dir` (created; must not exist or be empty)."""
    import torch
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    config = LlavaConfig(
        vision_config=_vision_config(spec),
        text_config=_text_config(spec, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        vision_feature_select_strategy="default" if spec.vision == "clip" else "full",
        vision_feature_layer=spec.feature_layers[0] if len(spec.feature_layers) == 1 else list(spec.feature_layers),
        projector_hidden_act="gelu",
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    _reinitialize(model, spec.init_std, spec.seed)
    model.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(out_dir)
    _build_processor(spec, tokenizer).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def shipped_vqa_checkpoint() -> pathlib.Path | None:
    """The visual-QA checkpoint trained here and shipped in the package (`quality.train_vqa`), or
    None in a tree without it."""
    path = pathlib.Path(__file__).resolve().parent / "vqa_tiny"
    return path if (path / "model.safetensors").is_file() else None


def cached_tiny_checkpoint(cache_dir: pathlib.Path, spec: TinySpec = TinySpec()) -> pathlib.Path:
    """The checkpoint for `spec` under `cache_dir`, built once (atomically) and reused after."""
    if spec != TinySpec(backbone=spec.backbone, vision=spec.vision, seed=spec.seed):
        raise ValueError("only backbone, vision and seed vary between cached tiny checkpoints")
    name = f"tiny-llava-{spec.backbone}-{spec.vision}-s{spec.seed}-{FORMAT_VERSION}"
    target = cache_dir / "models" / name
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_tiny_checkpoint(staging, spec)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; use its copy
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _text_config(spec: TinySpec, tokenizer):
    from transformers import AutoConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if spec.rope_parameters:
        common["rope_parameters"] = {"rope_theta": 10000.0, **dict(spec.rope_parameters)}
    extra = {
        "llama": {},
        "mistral": {"sliding_window": 64},     # small enough that long tests cross it
        "qwen2": {},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    }[spec.backbone]
    return AutoConfig.for_model(spec.backbone, **common, **extra)


def _vision_config(spec: TinySpec):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common = dict(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    if spec.vision == "clip":
        return CLIPVisionConfig(**common, projection_dim=spec.vision_hidden_size)
    return SiglipVisionConfig(**common)


def _reinitialize(model, std: float, seed: int) -> None:
    """Deterministic normal init of every weight matrix (norm weights stay at one)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _build_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
        model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_processor(spec: TinySpec, tokenizer):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if spec.vision == "clip":
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
        )
    else:
        image_processor = SiglipImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default" if spec.vision == "clip" else "full",
        num_additional_image_tokens=1 if spec.vision == "clip" else 0,
        chat_template=CHAT_TEMPLATE,
    )
