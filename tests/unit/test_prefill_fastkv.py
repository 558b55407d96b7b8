"""FastKV invariants (ALGORITHMS.md §3c) on CPU fp32."""

from __future__ import annotations

import math

import pytest
import torch

from epdserve.engine.sampler import SamplingParams
from epdserve.models.loader import load_decoder
from epdserve.models.spec import load_spec
from services.prefill.fastkv import FastKVConfig, kv_keep_index, selection_scores, tsp_index, window_scores
from services.prefill.layer_kv import CollectedLayers, OffloadingKV
from services.prefill.minisequence import MiniSequenceConfig
from services.prefill.prefill import PromptPrefiller, forward_prompt

GREEDY = SamplingParams(temperature=0.0)
MINI = MiniSequenceConfig(chunk_tokens=16, min_chunk_tokens=1)


@pytest.fixture(scope="module")
def model(tiny_checkpoint_factory):
    spec = load_spec(tiny_checkpoint_factory("llama", "clip", 5, num_layers=4))
    return spec, load_decoder(spec, dtype="float32", device="cpu")


def _embeds(decoder, length: int) -> torch.Tensor:
    ids = torch.randint(0, decoder.spec.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    return decoder.embed(ids)[0]


def _run(decoder, embeds, fastkv: FastKVConfig | None, **kwargs):
    collected = CollectedLayers()
    plan = fastkv.plan(decoder.spec.num_layers, embeds.shape[0]) if fastkv else None
    logits = forward_prompt(decoder, embeds, OffloadingKV("cpu", collected), MINI, plan, **kwargs)
    return logits, collected.layers()


def test_keep_everything_is_the_lossless_path_bitwise(model):
    _, decoder = model
    embeds = _embeds(decoder, 60)
    lossless_logits, lossless_kv = _run(decoder, embeds, None)
    for config in (FastKVConfig(tsp_rate=1.0, retain_rate=1.0), FastKVConfig(tsp_length=60, kv_budget=60)):
        logits, kv = _run(decoder, embeds, config)
        assert torch.equal(logits, lossless_logits)
        assert all(torch.equal(a, b) for a, b in zip(kv, lossless_kv))


def test_cache_sizes_per_layer_and_first_token_from_the_true_last_position(model):
    _, decoder = model
    length = 200
    config = FastKVConfig()  # tsp_rate 0.2, retain_rate 0.1, window 8, kernel 7
    plan = config.plan(decoder.spec.num_layers, length)
    assert plan.tsp_layer == 2 and plan.tsp_length == 40 and plan.kv_budget == 20
    logits, kv = _run(decoder, _embeds(decoder, length), config)
    assert logits.shape == (1, decoder.spec.vocab_size) and torch.isfinite(logits).all()
    assert [layer.shape[2] for layer in kv] == [20, 20, 20, 20]
    assert all(layer.shape[:2] == (2, decoder.spec.num_kv_heads) for layer in kv)


@pytest.mark.parametrize("length, config", [
    (200, FastKVConfig()),                                   # every layer compressed to the budget
    (60, FastKVConfig(tsp_rate=1.0, retain_rate=1.0)),       # keep everything
    (200, FastKVConfig(tsp_length=30, kv_budget=50)),        # layers after TSP see fewer than the budget
    (200, FastKVConfig(tsp_length=30, kv_budget=50, tsp_layer=3)),   # TSP at the last layer: no subset
    (12, FastKVConfig()),                                    # shorter than the window
])
def test_the_plan_knows_each_layers_kv_size_before_it_runs(model, length, config):
    """Prefill reserves the KV in the cache pool before computing it: the plan's sizes must be
    exactly what the layer loop stores."""
    _, decoder = model
    plan = config.plan(decoder.spec.num_layers, length)
    _, kv = _run(decoder, _embeds(decoder, length), config)
    assert plan.stored_lengths(length) == [layer.shape[2] for layer in kv]


def test_small_prompts_are_not_compressed(model):
    _, decoder = model
    config = FastKVConfig(kv_budget=64, tsp_length=128)
    _, kv = _run(decoder, _embeds(decoder, 50), config)
    assert [layer.shape[2] for layer in kv] == [50] * 4


@pytest.mark.parametrize("seed", range(5))
def test_tsp_index_is_sorted_in_range_exact_size_and_holds_the_window(seed):
    g = torch.Generator().manual_seed(seed)
    n, window = 300, 8
    length = int(torch.randint(window + 1, n, (1,), generator=g))
    scores = torch.rand(4, n - window, generator=g)
    index = tsp_index(scores, n, length, window)
    assert index.shape == (length,)
    assert bool((index[1:] > index[:-1]).all()) and int(index[0]) >= 0 and int(index[-1]) == n - 1
    assert set(range(n - window, n)) <= set(index.tolist())
    top = set(scores.sum(0).topk(length - window).indices.tolist())
    assert top == set(index.tolist()) - set(range(n - window, n))


def test_kv_keep_index_is_one_selection_per_kv_head_with_the_window():
    scores = torch.rand(3, 92, generator=torch.Generator().manual_seed(1))
    index = kv_keep_index(scores, 100, budget=20, window=8)
    assert index.shape == (3, 20)
    for head in range(3):
        kept = index[head].tolist()
        assert len(set(kept)) == 20 and kept[-8:] == list(range(92, 100))
        assert set(kept[:12]) == set(scores[head].topk(12).indices.tolist())


def test_window_scores_match_eager_attention_rows(model):
    """The hand-computed scores equal the last-window rows of an explicit causal softmax(QK^T),
    summed per query head over the prefix, average-pooled, then summed over each KV group."""
    spec, decoder = model
    d = decoder.spec
    n, window, kernel = 40, 8, 7
    layer = decoder.layers[0]
    h = _embeds(decoder, n)[None]
    x = layer.input_layernorm(h)
    cos, sin = decoder.cos_sin(torch.arange(n))
    attn = layer.self_attn
    k = attn.k_proj(x).view(1, n, d.num_kv_heads, d.head_dim).transpose(1, 2)
    from epdserve.models.layers import apply_rope

    keys = apply_rope(k, cos, sin)[0]
    q_all = apply_rope(attn.q_proj(x).view(1, n, d.num_heads, d.head_dim).transpose(1, 2), cos, sin)[0]
    group = d.num_heads // d.num_kv_heads
    logits = q_all @ keys.repeat_interleave(group, 0).transpose(1, 2) / math.sqrt(d.head_dim)
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    rows = logits.softmax(-1)[:, -window:, : n - window].sum(1)
    pooled = torch.nn.functional.avg_pool1d(rows[:, None], kernel, 1, kernel // 2)[:, 0]
    expected = pooled.view(d.num_kv_heads, group, -1).sum(1)
    config = FastKVConfig(window=window, pool_kernel=kernel)
    actual = window_scores(q_all[:, -window:], keys, config)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_tokens_after_tsp_keep_their_original_positions(model, monkeypatch):
    _, decoder = model
    seen = []
    real = decoder.cos_sin
    monkeypatch.setattr(decoder, "cos_sin", lambda positions: seen.append(positions.clone()) or real(positions))
    _run(decoder, _embeds(decoder, 100), FastKVConfig(tsp_length=30, kv_budget=16))
    assert len(seen) == 2 and torch.equal(seen[0], torch.arange(100))
    later = seen[1]
    assert later.shape == (30,) and bool((later[1:] > later[:-1]).all()) and later[-8:].tolist() == list(range(92, 100))


def test_decode_continues_from_the_logical_length(model):
    """Decode from a compressed KV puts new tokens at positions L, L+1, ... (not the stored length)."""
    from services.decode.decoder import TokenDecoder

    spec, decoder = model
    prefiller = PromptPrefiller(spec, decoder, MINI)
    token_ids = list(range(4, 124))
    result = prefiller.run(token_ids, [], GREEDY, fastkv=FastKVConfig(tsp_length=40, kv_budget=24))
    assert result.length == 120 and all(layer.shape[2] == 24 for layer in result.kv_layers)
    steps = TokenDecoder(decoder)
    seq = steps.load(result.kv_layers, result.first_token_id, 4, GREEDY, result.length)
    seen = []
    real = decoder.cos_sin
    decoder.cos_sin = lambda positions: seen.append(int(positions[0])) or real(positions)
    try:
        for _ in range(3):
            steps.step(seq)
    finally:
        del decoder.cos_sin
    assert seen == [120, 121, 122] and seq.kv.stored == [27] * 4


def test_fastkv_refuses_the_prefix_cache(model):
    spec, decoder = model
    with pytest.raises(ValueError, match="prefix cache"):
        PromptPrefiller(spec, decoder).run(list(range(40)), [], GREEDY, publish_blocks_upto=1, block_tokens=16,
                                           fastkv=FastKVConfig())


@pytest.mark.parametrize("kwargs,match", [({"tsp_rate": 0.0}, "tsp_rate"), ({"retain_rate": 1.5}, "retain_rate"),
                                          ({"pool_kernel": 4}, "pool_kernel"), ({"pooling": "min"}, "pooling"),
                                          ({"head_selection": "per-query"}, "head_selection")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FastKVConfig(**kwargs)


def test_a_request_turning_fastkv_on_takes_the_deployments_settings():
    """--fastkv-tsp-layer etc. shape the FastKV a request asks for even while the deployment's
    default is lossless; the request's own non-zero fields still win; enabled=false is lossless."""
    from epdserve.v1 import common_pb2, prefill_pb2
    from services.wire import fastkv_from_proto

    deployment = FastKVConfig(tsp_layer=1, window=4, tsp_rate=0.3)
    asks = prefill_pb2.PrefillRequest(fastkv=common_pb2.FastKVSettings(enabled=True, retain_rate=0.5))
    assert fastkv_from_proto(asks, None, base=deployment) == FastKVConfig(tsp_layer=1, window=4, tsp_rate=0.3,
                                                                          retain_rate=0.5)
    assert fastkv_from_proto(asks, None) == FastKVConfig(retain_rate=0.5)
    assert fastkv_from_proto(prefill_pb2.PrefillRequest(), None, base=deployment) is None
    off = prefill_pb2.PrefillRequest(fastkv=common_pb2.FastKVSettings(enabled=False))
    assert fastkv_from_proto(off, deployment, base=deployment) is None


def test_per_head_selection_keeps_what_most_query_heads_picked(monkeypatch):
    """The ablation of GQA-aware selection: a KV head keeps the positions most of its query heads
    picked themselves, ties broken by the summed score, where GQA-aware keeps the top summed
    scores. Head 0 picks {0, 2}, head 1 picks {1, 2}: votes keep 2 (both) then 0 (larger sum)."""
    import services.prefill.fastkv as fastkv

    pooled = torch.tensor([[0.90, 0.04, 0.05, 0.0, 0.0], [0.01, 0.50, 0.45, 0.0, 0.0]])
    monkeypatch.setattr(fastkv, "_pooled_head_scores", lambda q_win, keys, config: pooled)
    keys, q = torch.zeros(1, 6, 4), torch.zeros(2, 1, 4)     # one KV head, two query heads, window 1
    gqa = selection_scores(q, keys, FastKVConfig(window=1), picks=2)[1]
    per_head = selection_scores(q, keys, FastKVConfig(window=1, head_selection="per-head"), picks=2)[1]
    assert set(kv_keep_index(gqa, 6, budget=3, window=1)[0, :2].tolist()) == {0, 1}
    assert set(kv_keep_index(per_head, 6, budget=3, window=1)[0, :2].tolist()) == {0, 2}


def test_per_head_selection_without_gqa_is_the_same_selection():
    generator = torch.Generator().manual_seed(3)
    q, keys = torch.randn(2, 4, 8, generator=generator), torch.randn(2, 50, 8, generator=generator)
    for picks in (1, 10, 30):
        config = FastKVConfig(window=4)
        gqa = kv_keep_index(selection_scores(q, keys, config, picks)[1], 50, picks + 4, 4)
        per_head = kv_keep_index(selection_scores(q, keys, FastKVConfig(window=4, head_selection="per-head"), picks)[1],
                                 50, picks + 4, 4)
        for head in range(2):
            assert set(gqa[head].tolist()) == set(per_head[head].tolist())


def test_per_head_selection_keeps_everything_when_nothing_is_compressed(model):
    _, decoder = model
    embeds = _embeds(decoder, 40)
    lossless_logits, lossless_kv = _run(decoder, embeds, None)
    logits, kv = _run(decoder, embeds, FastKVConfig(tsp_length=64, kv_budget=64, head_selection="per-head"))
    assert torch.equal(logits, lossless_logits)
    assert all(torch.equal(a, b) for a, b in zip(kv, lossless_kv))


def test_per_head_selection_changes_only_the_kv_kept(model, monkeypatch):
    """In the prefill loop the ablation decides each layer's kept KV from the votes, while TSP
    still ranks tokens by the GQA-aware scores (so the ablation isolates KV selection)."""
    import services.prefill.prefill as prefill

    _, decoder = model
    calls = []
    real_keep, real_tsp = prefill.kv_keep_index, prefill.tsp_index
    monkeypatch.setattr(prefill, "kv_keep_index",
                        lambda scores, *a: calls.append(("keep", scores)) or real_keep(scores, *a))
    monkeypatch.setattr(prefill, "tsp_index", lambda scores, *a: calls.append(("tsp", scores)) or real_tsp(scores, *a))
    embeds = _embeds(decoder, 80)
    _run(decoder, embeds, FastKVConfig(tsp_length=40, kv_budget=16, head_selection="per-head"))
    per_head = list(calls)
    calls.clear()
    _run(decoder, embeds, FastKVConfig(tsp_length=40, kv_budget=16))
    group = list(calls)
    kinds = [kind for kind, _ in group]
    assert [kind for kind, _ in per_head] == kinds and "tsp" in kinds and "keep" in kinds
    for (kind, a), (_, b) in zip(per_head, group):
        if kind == "tsp":
            assert torch.equal(a, b)
    assert any(kind == "keep" and not torch.equal(a.float(), b.float()) for (kind, a), (_, b) in zip(per_head, group))
