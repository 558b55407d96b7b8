"""GPU tier: the same correctness anchors on CUDA (skipped without a GPU).

Tolerances follow ALGORITHMS.md §0.2: fp32 logits within 1e-4 of transformers on the same GPU,
exact greedy tokens in fp32 and, on short fixtures, in bf16.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from epdserve.engine.generation import generate, new_kv, prefill
from epdserve.engine.sampler import SamplingParams
from epdserve.models.decoder import merge_image_embeddings
from epdserve.models.loader import load_decoder, load_vision_encoder
from epdserve.models.spec import load_spec

pytestmark = pytest.mark.gpu


def _inputs(model_dir, images):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": "What is shown?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return processor(images=images, text=text, return_tensors="pt").to("cuda")


def _images():
    return [Image.fromarray(np.random.RandomState(s).randint(0, 256, (40, 48, 3), dtype=np.uint8)) for s in (1, 2)]


@pytest.mark.parametrize("backbone,vision", [("llama", "clip"), ("mistral", "clip"), ("qwen2", "siglip"),
                                             ("mixtral", "clip")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_matches_transformers(tiny_checkpoint_factory, backbone, vision, dtype):
    from transformers import LlavaForConditionalGeneration

    model_dir = tiny_checkpoint_factory(backbone, vision, 11)
    torch_dtype = getattr(torch, dtype)
    inputs = _inputs(model_dir, _images())
    inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
    hf = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype).to("cuda").eval()
    new = 16 if dtype == "float32" else 8
    with torch.inference_mode():
        hf_logits = hf(**inputs).logits[0].float()
        hf_tokens = hf.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    hf_tokens = hf_tokens[0, inputs["input_ids"].shape[1]:].tolist()
    spec = load_spec(model_dir)
    decoder = load_decoder(spec, dtype=dtype, device="cuda")
    vision_encoder = load_vision_encoder(spec, dtype=dtype, device="cuda")
    ids = inputs["input_ids"][0]
    with torch.inference_mode():
        rows = vision_encoder(inputs["pixel_values"]).reshape(-1, spec.decoder.hidden_size)
        embeds = merge_image_embeddings(decoder.embed(ids[None])[0], ids, spec.image_token_id, rows)
    logits = prefill(decoder, embeds, new_kv(decoder, len(ids)), all_logits=True).float()
    tokens = list(generate(decoder, embeds, new, SamplingParams(temperature=0.0), ignore_eos=True))
    assert tokens == hf_tokens
    tol = 1e-4 if dtype == "float32" else 5e-2
    torch.testing.assert_close(logits, hf_logits, rtol=tol, atol=tol)


def test_cluster_on_cuda_matches_transformers(tiny_checkpoint):
    from transformers import LlavaForConditionalGeneration

    from epdserve.launcher import ClusterConfig, LocalCluster
    from epdserve.sdk import Client

    image = _images()[0]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    with LocalCluster(ClusterConfig(model_dir=tiny_checkpoint, device="cuda", dtype="float32")) as cluster:
        with Client(cluster.router_address, timeout_s=120) as client:
            result = client.generate("What is shown?", images=[buf.getvalue()], max_tokens=12, temperature=0.0,
                                     ignore_eos=True)
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).to("cuda").eval()
    inputs = _inputs(tiny_checkpoint, [Image.open(io.BytesIO(buf.getvalue())).convert("RGB")])
    with torch.inference_mode():
        out = hf.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert list(result.token_ids) == out[0, inputs["input_ids"].shape[1]:].tolist()
