"""Local prefill in the decode engine (E -> PD) with online insertion (CPU, tiny checkpoints):
streams equal the reference generate loop, a prefill step never decodes, the insertion policy
decides when prompts enter, aborts of queued prompts release their inputs."""

from __future__ import annotations

import pytest
import torch

from epdserve.config import DecodeConfig
from epdserve.engine.generation import generate
from epdserve.engine.sampler import SamplingParams
from epdserve.models.loader import load_decoder
from epdserve.models.spec import load_spec
from services.decode.insertion import StepCosts
from services.decode.local_prefill import LocalPrefill, PromptJob
from services.decode.setup import build_engine

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=3)


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def model(request, tiny_checkpoint_factory):
    spec = load_spec(tiny_checkpoint_factory(request.param, "clip", 5))
    return spec, load_decoder(spec, dtype="float32", device="cpu")


def engine_for(model, policy="fcfs", **config):
    spec, decoder = model
    options = dict(block_size=4, max_context=512, kv_cache_gib=0.01, insertion_policy=policy)
    options.update(config)
    return build_engine(decoder, DecodeConfig(**options), spec)


def engine_with_slow_prefill(model):
    """A Lagrangian engine whose (not yet refitted) cost model says a prefill step takes 10 s."""
    engine = engine_for(model, "lagrangian")
    local = engine.local
    engine.local = LocalPrefill(local.prefiller, "lagrangian", local.capacity, StepCosts(10.0, 0.0, 0.001, 0.0))
    return engine


def prompt(model, request_id, length, max_new, sampling=GREEDY) -> PromptJob:
    vocab = model[0].decoder.vocab_size
    ids = torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    return PromptJob(request_id, ids, [], max_new, sampling)


def reference(model, job: PromptJob) -> list[int]:
    decoder = model[1]
    embeds = decoder.embed(torch.tensor([job.token_ids]))[0]
    return list(generate(decoder, embeds, job.max_new_tokens, job.sampling, ignore_eos=True))


def run(engine, schedule):
    streams, kinds, step = {}, [], 0
    while engine.has_work or any(k >= step for k in schedule):
        result = engine.step(schedule.get(step, []))
        decoded = result.batch_size > 0
        prefilled = any(e.request_id not in streams for e in result.tokens)
        assert not (decoded and prefilled), "a step both prefilled and decoded"
        kinds.append("P" if prefilled else "D" if decoded else "-")
        for event in result.tokens:
            streams.setdefault(event.request_id, []).append(event.token)
        step += 1
        assert step < 400
    return streams, kinds


@pytest.mark.parametrize("policy", ["fcfs", "lagrangian"])
def test_local_prompts_stream_the_reference_tokens(model, policy):
    jobs = [prompt(model, "a", 12, 9), prompt(model, "b", 30, 6, SAMPLED), prompt(model, "c", 7, 1),
            prompt(model, "d", 21, 14)]
    expected = {job.request_id: reference(model, job) for job in jobs}
    engine = engine_for(model, policy)
    streams, kinds = run(engine, {0: jobs[:2], 3: jobs[2:]})
    assert streams == expected
    assert kinds[0] == "P" and "D" in kinds
    assert engine.kv.num_free_blocks == engine.kv.capacity_blocks


def test_lagrangian_keeps_decoding_while_a_prefill_costs_more_than_idle_slots(model):
    engine = engine_with_slow_prefill(model)
    engine.step([prompt(model, "long", 10, 40)])  # n = 0: always prefill
    result = engine.step([prompt(model, "waits", 8, 3)])
    assert result.batch_size == 1 and [job.request_id for job in engine.local.queue] == ["waits"]
    fcfs = engine_for(model, "fcfs")
    fcfs.step([prompt(model, "long", 10, 40)])
    result = fcfs.step([prompt(model, "waits", 8, 3)])
    assert result.batch_size == 0 and not fcfs.local.queue  # FCFS pauses the decode at once


def test_an_aborted_queued_prompt_releases_its_inputs(model):
    engine = engine_with_slow_prefill(model)
    engine.step([prompt(model, "run", 10, 40)])
    engine.step([prompt(model, "queued", 8, 3)])
    result = engine.step([], ["queued"])
    assert result.aborted == ["queued"] and "queued" in result.inputs_done and not engine.local.queue


def test_an_engine_without_local_prefill_refuses_prompts(model):
    engine = engine_for(model, local_prefill=False)
    with pytest.raises(ValueError, match="does not prefill"):
        engine.step([prompt(model, "x", 5, 2)])
