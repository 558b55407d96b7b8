"""Correctness anchor: epdserve's own decoder forward gives the same greedy tokens and (within fp32
tolerance) the same prefill logits as `transformers` LlavaForConditionalGeneration on the same
checkpoint, for every supported backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from epdserve.engine.generation import generate, new_kv, prefill
from epdserve.engine.sampler import SamplingParams
from epdserve.models.decoder import merge_image_embeddings
from epdserve.models.loader import load_decoder, load_vision_encoder
from epdserve.models.spec import load_spec

pytestmark = pytest.mark.unit

NEW_TOKENS = 20
CASES = [
    ("llama", "clip", 1),
    ("mistral", "clip", 2),
    ("qwen2", "siglip", 3),
    ("mixtral", "clip", 4),
    ("llama", "siglip", 5),
]


def _image(seed: int, size=(40, 52)) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _hf_inputs(model_dir, prompt_text: str, images):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt_text}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return processor(images=images, text=text, return_tensors="pt")


def _ours(model_dir, inputs):
    spec = load_spec(model_dir)
    decoder, vision = load_decoder(spec, device="cpu"), load_vision_encoder(spec, device="cpu")
    ids = inputs["input_ids"][0]
    with torch.inference_mode():
        image_rows = vision(inputs["pixel_values"]).reshape(-1, spec.decoder.hidden_size)
        embeds = merge_image_embeddings(decoder.embed(ids[None])[0], ids, spec.image_token_id, image_rows)
    logits = prefill(decoder, embeds, new_kv(decoder, len(ids)), all_logits=True)
    tokens = list(generate(decoder, embeds, NEW_TOKENS, SamplingParams(temperature=0.0), ignore_eos=True))
    return logits, tokens


def _hf(model_dir, inputs):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(**inputs).logits[0]
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return logits, out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("backbone,vision,seed", CASES)
def test_greedy_tokens_and_logits_match_transformers(tiny_checkpoint_factory, backbone, vision, seed):
    model_dir = tiny_checkpoint_factory(backbone, vision, seed)
    inputs = _hf_inputs(model_dir, "What is in these pictures?", [_image(seed), _image(seed + 100, (30, 30))])
    hf_logits = _assert_matches_transformers(model_dir, inputs)
    assert len(set(hf_logits.argmax(-1).tolist())) > 1, "degenerate fixture: logits would not reveal a wrong model"


def _assert_matches_transformers(model_dir, inputs) -> torch.Tensor:
    """Same greedy tokens, and prefill logits within fp32 tolerance; returns transformers' logits."""
    hf_logits, hf_tokens = _hf(model_dir, inputs)
    our_logits, our_tokens = _ours(model_dir, inputs)
    assert our_tokens == hf_tokens
    torch.testing.assert_close(our_logits, hf_logits, rtol=1e-4, atol=1e-4)
    return hf_logits


@pytest.mark.parametrize(
    "options",
    [
        {"rope_parameters": (("rope_type", "linear"), ("factor", 4.0))},
        {"rope_parameters": (("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
                             ("high_freq_factor", 4.0), ("original_max_position_embeddings", 64))},
        {"rope_parameters": (("rope_type", "yarn"), ("factor", 4.0), ("original_max_position_embeddings", 64))},
        {"feature_layers": (-3, -1)},
    ],
    ids=["rope-linear", "rope-llama3", "rope-yarn", "feature-layers-list"],
)
def test_checkpoint_variants_match_transformers(tiny_checkpoint_factory, options):
    model_dir = tiny_checkpoint_factory("llama", "clip", 6, **options)
    spec = load_spec(model_dir)
    if "rope_parameters" in options:
        assert spec.decoder.rope_type == dict(options["rope_parameters"])["rope_type"]
    else:
        assert spec.vision.feature_layers == (-3, -1)
    _assert_matches_transformers(model_dir, _hf_inputs(model_dir, "Which shapes are there? " * 4, [_image(9)]))


def test_mistral_sliding_window_is_crossed_and_still_matches(tiny_checkpoint_factory):
    """The tiny Mistral has a 64-token window; a 100+ token prompt exercises the window mask."""
    model_dir = tiny_checkpoint_factory("mistral", "clip", 2)
    long_text = "Describe every detail of the picture, its colours, its shapes and its mood. " * 2
    inputs = _hf_inputs(model_dir, long_text, [_image(7)])
    assert inputs["input_ids"].shape[1] > 2 * load_spec(model_dir).decoder.sliding_windows[0]
    _assert_matches_transformers(model_dir, inputs)


def test_text_only_prompt_matches(tiny_checkpoint_factory):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model_dir = tiny_checkpoint_factory("qwen2", "siglip", 3)
    ids = AutoTokenizer.from_pretrained(model_dir)("Hello there, how are you?", return_tensors="pt")["input_ids"]
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        hf = model.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    decoder = load_decoder(model_dir, device="cpu")
    ours = list(generate(decoder, decoder.embed(ids)[0], 16, SamplingParams(temperature=0.0), ignore_eos=True))
    assert ours == hf.tolist()
