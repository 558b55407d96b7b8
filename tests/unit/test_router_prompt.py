"""The router's tokenization equals what the checkpoint's own LlavaProcessor produces."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from epdserve.errors import InvalidArgumentError
from epdserve.models.prompt import PromptBuilder
from epdserve.models.spec import load_spec
from services.router.requests import check_context

pytestmark = pytest.mark.unit


def _images(n):
    return [Image.fromarray(np.full((20 + i, 30, 3), i * 40, dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("backbone,vision", [("llama", "clip"), ("qwen2", "siglip")])
@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_chat_mode_matches_processor(tiny_checkpoint_factory, backbone, vision, num_images):
    from transformers import AutoProcessor

    model_dir = tiny_checkpoint_factory(backbone, vision, 0)
    processor = AutoProcessor.from_pretrained(model_dir)
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": "Describe, please ✨"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    expected = processor(images=_images(num_images) or None, text=text)["input_ids"][0]
    built = PromptBuilder(load_spec(model_dir)).build("Describe, please ✨", num_images, raw=False)
    assert list(built.token_ids) == list(expected)
    assert built.image_tokens == num_images * load_spec(model_dir).tokens_per_image


def test_raw_mode_matches_processor(tiny_checkpoint):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    prompt = "USER: <image>\nfirst <image> second\nASSISTANT:"
    expected = processor(images=_images(2), text=prompt)["input_ids"][0]
    built = PromptBuilder(load_spec(tiny_checkpoint)).build(prompt, 2, raw=True)
    assert list(built.token_ids) == list(expected)


@pytest.mark.parametrize("prompt,images,raw", [("no placeholder", 1, True), ("<image> <image>", 1, True),
                                                ("extra <image> in chat mode", 1, False)])
def test_placeholder_mismatch_is_invalid_argument(tiny_checkpoint, prompt, images, raw):
    with pytest.raises(InvalidArgumentError, match="image placeholder"):
        PromptBuilder(load_spec(tiny_checkpoint)).build(prompt, images, raw=raw)


def test_context_limit_names_both_numbers():
    expected = (r"prompt \(100 tokens, of which 16 image tokens\) \+ params.max_tokens \(50\) = 150 "
                r"exceeds the model's context length \(128\)")
    with pytest.raises(InvalidArgumentError, match=expected):
        check_context(100, 16, 50, 128)
    check_context(100, 16, 28, 128)
