"""MOM invariants (ALGORITHMS.md §1c) on CPU fp32: mini-sequence chunking is bitwise exact, the
offloaded KV equals the plain KV, last-position mode keeps the greedy token, greedy generation
through the prefill path equals the reference loop."""

from __future__ import annotations

import pytest
import torch

from epdserve.engine.generation import generate, new_kv, prefill
from epdserve.engine.sampler import SamplingParams
from epdserve.models.loader import load_decoder
from epdserve.models.spec import load_spec
from services.prefill.layer_kv import CollectedLayers, OffloadingKV
from services.prefill.minisequence import MiniSequenceConfig, map_chunks, residual_chunks
from services.prefill.prefill import PromptPrefiller, forward_prompt

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def decoder(request, tiny_checkpoint_factory):
    return load_decoder(load_spec(tiny_checkpoint_factory(request.param, "clip", 3)), dtype="float32", device="cpu")


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, decoder) -> None:
    """Bitwise for dense MLPs. A MoE layer runs each expert on the tokens routed to it, so a chunk
    hands it a different (often tiny) row count and MKL rounds such GEMMs differently: the same
    values up to float32 rounding there."""
    if decoder.spec.moe is None:
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def _embeds(decoder, length: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, decoder.spec.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    return decoder.embed(ids)[0]


# CPU fp32 tier of ALGORITHMS §0.2. MKL switches GEMM kernels (and rounding) for very short
# matrices (measured on an Intel host: up to 5 rows at K=128, up to 15 rows at K=512; on an AMD EPYC:
# 1-11 rows except multiples of 4, at every K), so the fixtures keep every mini-sequence >= 12 rows
# (production chunks are >= 1024 rows).
@pytest.mark.parametrize("length,chunk", [(5, 16), (16, 16), (25, 16), (41, 16), (50, 16), (1, 16)])
@torch.inference_mode()
def test_mini_sequence_mlp_and_lm_head_are_bitwise_exact(decoder, length, chunk):
    layer = decoder.layers[0]
    h = torch.randn(1, length, decoder.spec.hidden_size, generator=torch.Generator().manual_seed(length))

    def block(rows):
        return layer.feed_forward(layer.post_attention_layernorm(rows))

    expected = h + block(h)
    source = h.clone()
    _assert_same(residual_chunks(lambda a, b: block(source[:, a:b]), source, chunk), expected, decoder)
    assert torch.equal(map_chunks(decoder.logits, h[0], chunk), decoder.logits(h[0]))


def _reference(decoder, embeds):
    kv = new_kv(decoder, embeds.shape[0])
    logits = prefill(decoder, embeds, kv, all_logits=True)
    return logits, [kv.layer_tensor(i) for i in range(kv.num_layers)]


@pytest.mark.parametrize("length,chunk", [(7, 16), (16, 16), (37, 16), (50, 16)])
def test_full_logits_and_offloaded_kv_equal_the_plain_path_bitwise(decoder, length, chunk):
    embeds = _embeds(decoder, length)
    expected_logits, expected_kv = _reference(decoder, embeds)
    collected = CollectedLayers()
    mini = MiniSequenceConfig(chunk_tokens=chunk, min_chunk_tokens=1)
    logits = forward_prompt(decoder, embeds, OffloadingKV("cpu", collected), mini, all_logits=True)
    _assert_same(logits, expected_logits, decoder)
    layers = collected.layers()
    assert len(layers) == decoder.spec.num_layers
    for a, b in zip(layers, expected_kv):
        _assert_same(a, b, decoder)


def test_last_position_mode_returns_one_row_with_the_same_greedy_token(decoder):
    embeds = _embeds(decoder, 40, seed=1)
    expected_logits, expected_kv = _reference(decoder, embeds)
    collected = CollectedLayers()
    mini = MiniSequenceConfig(chunk_tokens=16, min_chunk_tokens=1)
    logits = forward_prompt(decoder, embeds, OffloadingKV("cpu", collected), mini)
    assert logits.shape == (1, decoder.spec.vocab_size)
    torch.testing.assert_close(logits[0], expected_logits[-1], rtol=1e-5, atol=1e-5)
    assert int(logits[0].argmax()) == int(expected_logits[-1].argmax())
    for a, b in zip(collected.layers(), expected_kv):  # the KV precedes the skipped rows
        _assert_same(a, b, decoder)


def test_layers_are_handed_off_in_order_as_they_finish(decoder):
    seen = []
    prefiller = PromptPrefiller(load_spec_of(decoder), decoder, MiniSequenceConfig(chunk_tokens=4, min_chunk_tokens=1))
    result = prefiller.run(list(range(3, 20)), [], GREEDY, on_layer=lambda i, t, ready: seen.append((i, t.shape)))
    assert [i for i, _ in seen] == list(range(decoder.spec.num_layers))
    assert all(shape[2] == 17 for _, shape in seen) and result.length == 17


def load_spec_of(decoder):
    class Spec:  # the prefiller reads only these fields on this path
        image_token_id = -1
        decoder = None

    spec = Spec()
    spec.decoder = decoder.spec
    return spec


def test_greedy_tokens_through_prefill_then_decode_equal_the_reference_loop(decoder):
    from services.decode.decoder import TokenDecoder

    token_ids = list(range(5, 40))
    embeds = decoder.embed(torch.tensor([token_ids]))[0]
    expected = list(generate(decoder, embeds, 12, GREEDY, ignore_eos=True))
    prefiller = PromptPrefiller(load_spec_of(decoder), decoder, MiniSequenceConfig(chunk_tokens=8, min_chunk_tokens=1))
    result = prefiller.run(token_ids, [], GREEDY)
    steps = TokenDecoder(decoder)
    seq = steps.load(result.kv_layers, result.first_token_id, 12, GREEDY, result.length)
    tokens = [result.first_token_id] + [steps.step(seq) for _ in range(11)]
    assert tokens == expected


def test_prefix_blocks_then_suffix_equal_a_full_prefill(decoder):
    token_ids = list(range(2, 50))
    spec = load_spec_of(decoder)
    full = PromptPrefiller(spec, decoder).run(token_ids, [], GREEDY, publish_blocks_upto=3, block_tokens=16)
    resumed = PromptPrefiller(spec, decoder).run(token_ids, [], GREEDY, full.new_blocks()[:2], 3, 16)
    assert resumed.computed_tokens == len(token_ids) - 32
    assert resumed.first_token_id == full.first_token_id
    for a, b in zip(resumed.kv_layers, full.kv_layers):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # the suffix attends in a different GEMM shape


@pytest.mark.parametrize("length,chunk", [(1, 4), (8, 8), (9, 8), (13, 4), (100, 7), (4096, 4096), (4097, 4096)])
def test_chunk_bounds_cover_the_sequence_with_near_equal_chunks(length, chunk):
    from services.prefill.minisequence import chunk_bounds

    bounds = chunk_bounds(length, chunk)
    assert bounds[0][0] == 0 and bounds[-1][1] == length and len(bounds) == -(-length // chunk)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) <= chunk and max(sizes) - min(sizes) <= 1


def test_chunk_length_follows_mom_rule():
    assert MiniSequenceConfig().chunk_length(1) == 4096
    assert MiniSequenceConfig().chunk_length(8) == 1024
    with pytest.raises(ValueError, match="chunk_tokens"):
        MiniSequenceConfig(chunk_tokens=0)
