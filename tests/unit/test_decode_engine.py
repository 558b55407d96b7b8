"""The continuously batched decode engine (CPU, tiny checkpoints): every sequence's stream equals
the single-sequence reference decoder whatever joins or leaves the batch; admission waits for free
KV; aborts and finishes free every block within one step; compressed (FastKV) prompts decode at
their logical length."""

from __future__ import annotations

import pytest
import torch

from epdserve.config import DecodeConfig
from epdserve.engine.generation import new_kv, prefill
from epdserve.engine.sampler import SamplingParams
from epdserve.models.loader import load_decoder
from epdserve.models.spec import load_spec
from services.decode.decoder import TokenDecoder
from services.decode.engine import DecodeEngine, DecodeJob
from services.decode.setup import build_engine

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.9, top_k=20, seed=7)


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "mixtral"])
def decoder(request, tiny_checkpoint_factory):
    return load_decoder(load_spec(tiny_checkpoint_factory(request.param, "clip", 5)), dtype="float32", device="cpu")


def make_engine(decoder, **config) -> DecodeEngine:
    options = dict(block_size=4, max_context=512, kv_cache_gib=0.01)
    options.update(config)
    return build_engine(decoder, DecodeConfig(**options))


def prompt_job(decoder, request_id: str, length: int, max_new: int, sampling=GREEDY, stops=()) -> DecodeJob:
    ids = torch.randint(3, decoder.spec.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    kv = new_kv(decoder, length)
    logits = prefill(decoder, decoder.embed(ids)[0], kv)
    layers = [kv.layer_tensor(layer) for layer in range(decoder.spec.num_layers)]
    return DecodeJob(request_id, layers, length, int(torch.argmax(logits)), max_new, sampling, frozenset(stops))


def reference_tokens(decoder, job: DecodeJob) -> list[int]:
    steps = TokenDecoder(decoder)
    seq = steps.load(job.layers, job.first_token, job.max_new_tokens, job.sampling, job.length)
    out = []
    for _ in range(job.max_new_tokens):
        out.append(steps.step(seq))
        if out[-1] in job.stop_token_ids:
            break
    return out


def run_to_end(engine: DecodeEngine, schedule: dict[int, list[DecodeJob]]):
    """Step until idle, arrivals handed in at the given step numbers. Returns streams and finishes."""
    streams: dict[str, list[int]] = {}
    finishes: dict[str, str] = {}
    step = 0
    while engine.has_work or any(k >= step for k in schedule):
        result = engine.step(schedule.get(step, []))
        for event in result.tokens:
            streams.setdefault(event.request_id, []).append(event.token)
            if event.finish:
                finishes[event.request_id] = event.finish
        for request_id in result.aborted:
            finishes[request_id] = "abort"
        step += 1
        assert step < 500
    return streams, finishes


def test_every_stream_equals_the_single_sequence_decoder_as_sequences_join_and_leave(decoder):
    jobs = [prompt_job(decoder, "a", 9, 12), prompt_job(decoder, "b", 70, 5, SAMPLED),
            prompt_job(decoder, "c", 33, 20), prompt_job(decoder, "d", 4, 8, SAMPLED), prompt_job(decoder, "e", 81, 9)]
    expected = {job.request_id: reference_tokens(decoder, job) for job in jobs}
    engine = make_engine(decoder)
    streams, finishes = run_to_end(engine, {0: jobs[:2], 2: jobs[2:4], 6: jobs[4:]})
    assert streams == expected
    assert set(finishes.values()) == {"length"}
    assert engine.kv.num_free_blocks == engine.kv.capacity_blocks and engine.kv.num_used_rows == 0


def test_the_batch_grows_and_shrinks_step_by_step(decoder):
    engine = make_engine(decoder)
    sizes = []
    jobs = {0: [prompt_job(decoder, "a", 10, 3)],
            1: [prompt_job(decoder, "b", 12, 6), prompt_job(decoder, "c", 5, 2)]}
    step = 0
    while engine.has_work or step < 2:
        sizes.append(engine.step(jobs.get(step, [])).batch_size)
        step += 1
    assert sizes == [1, 3, 3, 1, 1, 1, 1]


def test_a_stop_token_ends_the_stream_and_frees_the_row(decoder):
    job = prompt_job(decoder, "s", 20, 30)
    first_tokens = reference_tokens(decoder, job)
    stopper = prompt_job(decoder, "s", 20, 30, stops=(first_tokens[3],))
    streams, finishes = run_to_end(make_engine(decoder), {0: [stopper]})
    assert streams["s"] == first_tokens[: first_tokens.index(first_tokens[3]) + 1]
    assert finishes["s"] == "stop"


def test_a_compressed_prompt_decodes_at_its_logical_length(decoder):
    if any(w is not None for w in decoder.spec.sliding_windows):
        pytest.skip("compressed KV is refused for sliding-window models")
    job = prompt_job(decoder, "f", 60, 10)
    keep = [sorted(torch.randperm(60, generator=torch.Generator().manual_seed(i))[: 20 + 7 * i].tolist())
            for i in range(len(job.layers))]
    job.layers = [layer[:, :, rows].contiguous() for layer, rows in zip(job.layers, keep)]
    expected = reference_tokens(decoder, job)
    streams, _ = run_to_end(make_engine(decoder), {0: [job, prompt_job(decoder, "g", 30, 4)]})
    assert streams["f"] == expected


def test_admission_waits_for_free_kv_and_the_waiting_job_stops_reading_its_inputs(decoder):
    first, second = prompt_job(decoder, "x", 30, 10), prompt_job(decoder, "y", 30, 10)
    expected = reference_tokens(decoder, second)
    engine = make_engine(decoder)
    blocks = engine.kv.blocks_for(first.reserve_tokens) + 1  # one job's reservation + the scratch block
    engine = make_engine(decoder, kv_cache_gib=blocks * engine.kv.shape.bytes_per_block(torch.float32) / 2**30)
    original = second.layers
    result = engine.step([first, second])
    assert result.batch_size == 1 and [job.request_id for job in engine.waiting] == ["y"]
    assert set(result.inputs_done) == {"x", "y"}  # x copied into the cache, y into private memory
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(original, second.layers))
    streams, _ = run_to_end(engine, {})
    assert streams["y"] == expected and len(streams["x"]) == 9


def test_abort_frees_everything_within_one_step(decoder):
    engine = make_engine(decoder)
    engine.step([prompt_job(decoder, "r1", 40, 50), prompt_job(decoder, "r2", 12, 50)])
    result = engine.step([], ["r1", "missing"])
    assert result.aborted == ["r1"] and result.batch_size == 1
    assert "r1" not in engine.running and engine.kv.num_used_rows == 1
    result = engine.step([prompt_job(decoder, "w", 8, 4)], ["r2", "w"])
    assert sorted(result.aborted) == ["r2", "w"] and "w" in result.inputs_done
    assert not engine.has_work and engine.kv.num_free_blocks == engine.kv.capacity_blocks


def test_published_layers_land_in_the_paged_cache_unchanged(decoder):
    engine = make_engine(decoder)
    job = prompt_job(decoder, "k", 23, 1)
    layers = [layer.clone() for layer in job.layers]
    row = engine.kv.allocate(job.reserve_tokens)
    engine.kv.load(row, job.layers, job.length)
    for index, layer in enumerate(layers):
        k, v = engine.kv.layer_rows(row, index)
        assert torch.equal(k, layer[0]) and torch.equal(v, layer[1])
    assert int(engine.kv.lengths[row]) == 23


def test_reservations_beyond_the_table_or_the_pool_never_fit(decoder):
    engine = make_engine(decoder, max_context=64)
    assert engine.kv.fits_ever(64) and not engine.kv.fits_ever(65)
    with pytest.raises(ValueError, match="block_size"):
        DecodeConfig(block_size=12)


def test_text_sparsification_at_keep_rate_one_is_the_exact_path(decoder):
    def jobs():
        return [prompt_job(decoder, "a", 17, 10), prompt_job(decoder, "b", 40, 10, SAMPLED)]

    plain, _ = run_to_end(make_engine(decoder), {0: jobs()})
    same, _ = run_to_end(make_engine(decoder, text_keep_rate=1.0, text_sparsify_layer=1), {0: jobs()})
    assert same == plain


def test_dropped_generated_tokens_leave_the_kv_of_later_layers_only(decoder):
    engine = make_engine(decoder, text_keep_rate=0.5, text_sparsify_layer=1, text_scorer="hidden-norm")
    jobs = [prompt_job(decoder, f"s{i}", 20 + i, 80) for i in range(4)]
    engine.step(jobs)
    for _ in range(60):
        engine.step()
    produced = 61
    for seq in engine.running.values():
        stored = engine.kv.stored[seq.row].tolist()
        assert stored[0] == seq.prompt_rows + produced  # below the sparsification layer: every token
        kept = stored[1] - seq.prompt_rows
        assert 0 <= kept <= produced and int(engine.kv.lengths[seq.row]) == seq.job.length + produced
    kept_fraction = sum(int(engine.kv.stored[s.row, 1]) - s.prompt_rows for s in engine.running.values()) / (4 * 61)
    assert 0.35 <= kept_fraction <= 0.65


def test_a_learned_output_text_predictor_loads_from_safetensors(decoder, tmp_path):
    from safetensors.torch import save_file

    from services.decode.text_sparsify import OutputTextPredictor

    path = tmp_path / "pot.safetensors"
    save_file(OutputTextPredictor(decoder.spec.hidden_size).state_dict(), str(path))
    engine = make_engine(decoder, text_scorer="learned", text_predictor=str(path), text_sparsify_layer=1)
    streams, _ = run_to_end(engine, {0: [prompt_job(decoder, "l", 12, 6)]})
    assert len(streams["l"]) == 6
    save_file({"net.0.weight": torch.ones(3)}, str(path))
    with pytest.raises(ValueError, match="not an output-text predictor"):
        make_engine(decoder, text_scorer="learned", text_predictor=str(path), text_sparsify_layer=1)
