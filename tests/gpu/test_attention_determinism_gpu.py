"""Greedy decoding on CUDA is reproducible run to run: the same prompt and steps give the same
logits bit for bit. (PyTorch's default SDPA choice on Hopper for one-query GQA decode, cuDNN
attention, broke this: bench/moe_diff_gpu.py found it; models.layers.deterministic_sdpa avoids it.)"""

from __future__ import annotations

import pytest
import torch

from epdserve.engine.generation import decode_one, new_kv, prefill

pytestmark = pytest.mark.gpu


def _llama_8b_shaped(layers: int):
    """8B-shaped (hidden 4096, 32/8 heads) decoder cut to `layers`, N(0, 0.02) weights, bf16, CUDA."""
    from transformers import LlamaConfig

    from epdserve.models.decoder import Decoder
    from epdserve.models.layers import RotaryEmbedding
    from epdserve.models.spec import _decoder_spec

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
    spec = _decoder_spec(config, (2,))
    rope = RotaryEmbedding.from_hf_config(config, spec.head_dim, spec.rope_type).to("cuda")
    with torch.device("meta"):
        decoder = Decoder(spec, rope)
    decoder = decoder.to(torch.bfloat16).to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in decoder.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02, generator=gen)
    return decoder.eval()


@torch.inference_mode()
def _logits(decoder, prompt: torch.Tensor, feed: torch.Tensor) -> torch.Tensor:
    kv = new_kv(decoder, prompt.numel() + feed.numel())
    rows = [prefill(decoder, decoder.embed(prompt.cuda()[None])[0], kv)]
    rows += [decode_one(decoder, int(token), kv) for token in feed]
    return torch.stack(rows)


def test_repeated_greedy_decodes_give_identical_logits():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    decoder = _llama_8b_shaped(layers=8)
    gen = torch.Generator().manual_seed(1)
    prompt, feed = torch.randint(0, 32000, (512,), generator=gen), torch.randint(0, 32000, (96,), generator=gen)
    first = _logits(decoder, prompt, feed)
    for _ in range(2):
        again = _logits(decoder, prompt, feed)
        differing = (again != first).any(dim=-1).nonzero().flatten().tolist()
        assert not differing, f"steps {differing[:5]} differ between identical runs"
