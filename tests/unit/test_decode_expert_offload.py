"""MoE expert offloading wired into the decode engine (CPU fp32, tiny Mixtral: 4 experts, top-2).

The continuously batched engine over a decoder whose experts were placed by the service's
`place_experts` (every --expert-prefetch mode, a rate and a byte budget) streams exactly the tokens
of the all-resident engine while sequences join and leave; experts really moved (chunks copied,
some on demand); dense checkpoints and bad settings are refused with the flag named."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from epdserve.config import DecodeConfig
from epdserve.engine.expert_offload import OffloadedMoE
from epdserve.engine.expert_predictor import train_predictors
from epdserve.engine.generation import new_kv, prefill
from epdserve.engine.sampler import SamplingParams
from epdserve.errors import ModelLoadError
from epdserve.models.loader import load_decoder
from epdserve.models.spec import load_spec
from services.decode.engine import DecodeJob
from services.decode.setup import build_engine, place_experts

pytestmark = pytest.mark.unit
GREEDY = SamplingParams(temperature=0.0)
ENGINE = dict(block_size=4, max_context=256, kv_cache_gib=0.01)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("mixtral", "clip", 11, num_layers=4)


def _decoder(model_dir):
    return load_decoder(load_spec(model_dir), dtype="float32", device="cpu")


def _jobs(decoder) -> list[DecodeJob]:
    jobs = []
    for request_id, length, max_new in (("a", 9, 12), ("b", 30, 6), ("c", 17, 15), ("d", 5, 8)):
        ids = torch.randint(3, decoder.spec.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        kv = new_kv(decoder, length)
        logits = prefill(decoder, decoder.embed(ids)[0], kv)
        layers = [kv.layer_tensor(layer) for layer in range(decoder.spec.num_layers)]
        jobs.append(DecodeJob(request_id, layers, length, int(torch.argmax(logits)), max_new, GREEDY))
    return jobs


def _streams(decoder, config: DecodeConfig, jobs: list[DecodeJob]) -> dict[str, list[int]]:
    engine = build_engine(decoder, config)
    jobs = [dataclasses.replace(job, layers=list(job.layers)) for job in jobs]  # the engine lets go of layers
    schedule, streams, step = {0: jobs[:2], 3: jobs[2:]}, {}, 0
    while engine.has_work or step <= 3:
        for event in engine.step(schedule.get(step, [])).tokens:
            streams.setdefault(event.request_id, []).append(event.token)
        step += 1
    assert engine.kv.num_free_blocks == engine.kv.capacity_blocks
    return streams


@pytest.fixture(scope="module")
def resident(model_dir):
    decoder = _decoder(model_dir)
    jobs = _jobs(decoder)
    return jobs, _streams(decoder, DecodeConfig(**ENGINE), jobs)


@pytest.fixture(scope="module")
def learned_path(model_dir, tmp_path_factory):
    decoder = _decoder(model_dir)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, decoder.spec.vocab_size, (32,), generator=gen) for _ in range(3)]
    predictor, _ = train_predictors(decoder, batches, distance=1, width=16, epochs=2, batch_size=32)
    path = tmp_path_factory.mktemp("moe") / "predictor.safetensors"
    predictor.save(path)
    return str(path)


@pytest.mark.parametrize("options", [
    dict(expert_cache_rate=0.25),
    dict(expert_cache_rate=0.5, expert_prefetch_distance=2),
    dict(expert_cache_rate=0.25, expert_prefetch="reorder"),
    dict(expert_cache_rate=0.25, expert_prefetch="on-demand"),
    dict(expert_cache_gib="two experts per layer", expert_prefetch="learned"),
], ids=["skip-gate", "skip-gate-d2", "reorder", "on-demand", "learned-bytes"])
def test_engine_with_offloaded_experts_streams_the_resident_tokens(model_dir, resident, learned_path, options):
    jobs, expected = resident
    if options.get("expert_prefetch") == "learned":
        options = {**options, "expert_predictor": learned_path}
    decoder = _decoder(model_dir)
    if options.get("expert_cache_gib"):
        expert = decoder.layers[0].feed_forward.experts[0]
        expert_bytes = sum(p.numel() * p.element_size() for p in expert.parameters())
        options = {**options, "expert_cache_gib": 2 * decoder.spec.num_layers * expert_bytes / (1 << 30)}
    config = DecodeConfig(**ENGINE, **options)
    offloader = place_experts(decoder, config)
    try:
        assert offloader.capacity == (2 if config.expert_cache_gib else int(4 * config.expert_cache_rate))
        assert all(isinstance(layer.feed_forward, OffloadedMoE) for layer in decoder.layers)
        assert _streams(decoder, config, jobs) == expected
        stats = offloader.stats()
        assert stats.chunks_copied > 0 and stats.precise > stats.hits
    finally:
        offloader.close()


def test_experts_stay_resident_unless_asked(model_dir):
    decoder = _decoder(model_dir)
    assert place_experts(decoder, DecodeConfig(**ENGINE)) is None
    assert not any(isinstance(layer.feed_forward, OffloadedMoE) for layer in decoder.layers)


def test_a_dense_checkpoint_is_refused(tiny_checkpoint_factory):
    decoder = load_decoder(load_spec(tiny_checkpoint_factory("llama", "clip", 5)), dtype="float32", device="cpu")
    with pytest.raises(ModelLoadError, match="MoE checkpoint"):
        place_experts(decoder, DecodeConfig(**ENGINE, expert_cache_rate=0.5))


@pytest.mark.parametrize("budget", [dict(expert_cache_rate=0.1), dict(expert_cache_gib=1e-9)])
def test_a_budget_below_one_expert_per_layer_is_refused(model_dir, budget):
    with pytest.raises(ModelLoadError, match="less than one expert per layer"):
        place_experts(_decoder(model_dir), DecodeConfig(**ENGINE, **budget))


@pytest.mark.parametrize("options, message", [
    (dict(expert_cache_rate=0.0), "expert_cache_rate must be in"),
    (dict(expert_cache_rate=0.5, expert_cache_gib=1.0), "not both"),
    (dict(expert_cache_gib=-1.0), "expert_cache_gib must be >= 0"),
    (dict(expert_prefetch="oracle"), "expert_prefetch must be one of"),
    (dict(expert_prefetch="learned"), "expert_predictor"),
    (dict(expert_predictor="p.safetensors"), "expert_predictor"),
    (dict(expert_prefetch_distance=0), "expert_prefetch_distance must be >= 1"),
])
def test_bad_expert_settings_name_the_setting(options, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**options)
