"""A LLaVA-1.5-7B-shaped checkpoint with random weights, written fast (for GPU benchmarks).

CLIP-ViT-L/14-336 tower (1024 wide, 24 layers, 576 patch tokens), 2-layer MLP projector,
Llama-2-7B-shaped decoder (4096 wide, 32 layers, 32 heads, FFN 11008, vocab 32000), fp16.
Weights are drawn on the GPU when there is one (memory and time do not depend on their values)
and written as safetensors shards; the tokenizer, chat template and processor come from the
tiny-model factory (a byte-level tokenizer: the vocab ids past it are never produced by prompts).

    python bench/llava_checkpoint.py OUT_DIR [--layers N]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARD_BYTES = 2 << 30


def llava_7b_config(layers: int = 32):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from epdserve.models.tiny import IMAGE_PLACEHOLDER, _build_tokenizer

    tokenizer = _build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))
    config.dtype = "float16"
    return config, tokenizer


def build(out_dir: pathlib.Path, layers: int = 32) -> pathlib.Path:
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

    from epdserve.models.tiny import CHAT_TEMPLATE

    out_dir.mkdir(parents=True, exist_ok=True)
    config, tokenizer = llava_7b_config(layers)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    shard, size, index = {}, 0, 0
    names = _checkpoint_names(model)
    for name, shape in names:
        tensor = torch.randn(shape, generator=generator, device=device, dtype=torch.float16) * 0.02
        if name.endswith(("norm.weight", "layernorm.weight", "layer_norm1.weight", "layer_norm2.weight")):
            tensor = torch.ones(shape, dtype=torch.float16, device=device)
        shard[name] = tensor.cpu()
        size += tensor.numel() * 2
        if size >= SHARD_BYTES:
            save_file(shard, str(out_dir / f"shard-{index:03d}.safetensors"), metadata={"format": "pt"})
            shard, size, index = {}, 0, index + 1
    if shard:
        save_file(shard, str(out_dir / f"shard-{index:03d}.safetensors"), metadata={"format": "pt"})
    _write_index(out_dir)
    config.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(out_dir)
    processor = LlavaProcessor(image_processor=_image_processor(CLIPImageProcessor), tokenizer=tokenizer,
                               patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _image_processor(cls):
    return cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def _checkpoint_names(model) -> list[tuple[str, tuple[int, ...]]]:
    """Names in the classic LLaVA layout epdserve and transformers both load."""
    out = []
    for name, param in model.state_dict().items():
        for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                         ("model.vision_tower.", "vision_tower."),
                         ("model.multi_modal_projector.", "multi_modal_projector.")):
            if name.startswith(new):
                name = old + name[len(new):]
                break
        out.append((name, tuple(param.shape)))
    return out


def _write_index(out_dir: pathlib.Path) -> None:
    import json

    from safetensors import safe_open

    weight_map = {}
    for shard in sorted(out_dir.glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            weight_map.update({k: shard.name for k in f.keys()})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    print(build(args.out, args.layers))
