"""Offloaded KV (CPU: host pools and staging buffers are both CPU tensors, streams are no-ops):
whatever layers are offloaded, the token streams and the stored KV equal the all-on-GPU engine's;
the staging plan copies exactly the attended blocks as runs of consecutive ids; admission keeps
every running batch within one staging buffer; aborts and finishes free the host blocks."""

from __future__ import annotations

import pytest
import torch

from epdserve.config import DecodeConfig
from epdserve.engine.generation import new_kv, prefill
from epdserve.engine.offloaded_kv import CopyRun, OffloadedKVCache, merge_runs
from epdserve.engine.paged_kv import PagedKVShape
from epdserve.engine.sampler import SamplingParams
from epdserve.models.loader import load_decoder
from epdserve.models.spec import load_spec
from services.decode.engine import DecodeEngine, DecodeJob
from services.decode.offload_runner import build_offloaded_engine
from services.decode.setup import build_engine

pytestmark = pytest.mark.unit
GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.9, top_k=20, seed=7)
ALL = -1  # gpu_layers = every layer (the plain layout through the offload runner)


@pytest.fixture(scope="module", params=[("llama", 4), ("mistral", 4), ("qwen2", 2)], ids=lambda p: p[0])
def decoder(request, tiny_checkpoint_factory):
    backbone, layers = request.param
    path = tiny_checkpoint_factory(backbone, "clip", 5, num_layers=layers)
    return load_decoder(load_spec(path), dtype="float32", device="cpu")


def plain_engine(decoder, **config) -> DecodeEngine:
    return build_engine(decoder, DecodeConfig(**{"block_size": 4, "max_context": 512, "kv_cache_gib": 0.01, **config}))


def offloaded_engine(decoder, gpu_layers: int, staging_tokens: int = 2048, **config) -> DecodeEngine:
    options = {"block_size": 4, "max_context": 512, "kv_cache_gib": 0.01, **config}
    layers = decoder.spec.num_layers if gpu_layers == ALL else gpu_layers
    return build_offloaded_engine(decoder, DecodeConfig(**options), gpu_layers=layers, host_kv_gib=0.01,
                                  staging_tokens=staging_tokens)


def prompt_job(decoder, request_id: str, length: int, max_new: int, sampling=GREEDY) -> DecodeJob:
    ids = torch.randint(3, decoder.spec.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    ids = ids.to(decoder.device)
    kv = new_kv(decoder, length)
    logits = prefill(decoder, decoder.embed(ids)[0], kv)
    layers = [kv.layer_tensor(layer) for layer in range(decoder.spec.num_layers)]
    return DecodeJob(request_id, layers, length, int(torch.argmax(logits)), max_new, sampling)


def compressed(job: DecodeJob) -> DecodeJob:
    """FastKV-style: each layer keeps a different subset of the prompt's rows."""
    keep = [sorted(torch.randperm(job.length, generator=torch.Generator().manual_seed(i))[: 11 + 9 * i].tolist())
            for i in range(len(job.layers))]
    job.layers = [layer[:, :, rows].contiguous() for layer, rows in zip(job.layers, keep)]
    return job


def jobs_for(decoder) -> dict[int, list[DecodeJob]]:
    """Arrivals by step: lengths crossing blocks (and the tiny mistral's window of 64), both samplers."""
    schedule = {0: [prompt_job(decoder, "a", 9, 12), prompt_job(decoder, "b", 70, 5, SAMPLED)],
                2: [prompt_job(decoder, "c", 33, 20), prompt_job(decoder, "d", 4, 8, SAMPLED)],
                6: [prompt_job(decoder, "e", 81, 9)]}
    if not any(w is not None for w in decoder.spec.sliding_windows):  # compressed KV is refused with windows
        schedule[3] = [compressed(prompt_job(decoder, "f", 60, 10, SAMPLED))]
    return schedule


def run_to_end(engine: DecodeEngine, schedule: dict[int, list[DecodeJob]]) -> dict[str, list[int]]:
    streams: dict[str, list[int]] = {}
    step = 0
    while engine.has_work or any(k >= step for k in schedule):
        for event in engine.step(schedule.get(step, [])).tokens:
            streams.setdefault(event.request_id, []).append(event.token)
        step += 1
        assert step < 500
    return streams


@pytest.mark.parametrize("gpu_layers", [0, 1, ALL])
def test_streams_equal_the_plain_engine_as_sequences_join_and_leave(decoder, gpu_layers):
    expected = run_to_end(plain_engine(decoder), jobs_for(decoder))
    engine = offloaded_engine(decoder, gpu_layers)
    assert run_to_end(engine, jobs_for(decoder)) == expected
    assert engine.kv.num_free_blocks == engine.kv.capacity_blocks and engine.kv.num_used_rows == 0
    if gpu_layers != ALL:
        assert engine.runner.copied_bytes > 0


@pytest.mark.parametrize("gpu_layers", [0, 1, ALL])
def test_after_n_steps_every_layer_holds_the_plain_engines_kv(decoder, gpu_layers):
    plain, offloaded = plain_engine(decoder), offloaded_engine(decoder, gpu_layers)
    for engine in (plain, offloaded):
        for step in range(7):
            engine.step(jobs_for(decoder).get(step, []) if step < 4 else [])
    assert plain.running.keys() == offloaded.running.keys() and len(plain.running) >= 3
    for request_id, seq in plain.running.items():
        row = offloaded.running[request_id].row
        assert torch.equal(plain.kv.stored[seq.row], offloaded.kv.stored[row])
        for layer in range(decoder.spec.num_layers):
            for want, got in zip(plain.kv.layer_rows(seq.row, layer), offloaded.kv.layer_rows(row, layer)):
                assert torch.equal(want, got)
    if gpu_layers == 0:
        assert offloaded.kv.keys[0].data_ptr() != plain.kv.keys[0].data_ptr()
        assert all(pool.device.type == "cpu" for pool in offloaded.kv.pools(0))


def test_generated_token_sparsification_matches_the_plain_engine(decoder):
    options = {"text_keep_rate": 0.5, "text_sparsify_layer": 1}
    plain, offloaded = plain_engine(decoder, **options), offloaded_engine(decoder, 0, **options)
    jobs = [prompt_job(decoder, f"s{i}", 20 + 7 * i, 40) for i in range(3)]
    for engine in (plain, offloaded):
        engine.step([DecodeJob(j.request_id, list(j.layers), j.length, j.first_token, j.max_new_tokens, j.sampling)
                     for j in jobs])
        for _ in range(30):
            engine.step()
    for request_id, seq in plain.running.items():
        assert torch.equal(plain.kv.stored[seq.row], offloaded.kv.stored[offloaded.running[request_id].row])


def test_admission_keeps_the_running_batch_within_one_staging_buffer(decoder):
    engine = offloaded_engine(decoder, 0, staging_tokens=64, max_context=64)  # 16 staging blocks
    first, second = prompt_job(decoder, "x", 30, 10), prompt_job(decoder, "y", 30, 10)  # 10 blocks each
    expected = run_to_end(plain_engine(decoder), {0: [prompt_job(decoder, "y", 30, 10)]})["y"]
    result = engine.step([first, second])
    assert result.batch_size == 1 and [job.request_id for job in engine.waiting] == ["y"]
    assert engine.kv.num_free_blocks >= 10 and not engine.kv.can_allocate(40) and engine.kv.can_allocate(24)
    assert engine.kv.fits_ever(64) and not engine.kv.fits_ever(65)
    streams = run_to_end(engine, {})
    assert streams["y"] == expected and len(streams["x"]) == 9
    with pytest.raises(ValueError, match="staging_tokens"):
        offloaded_engine(decoder, 0, staging_tokens=63, max_context=64)
    with pytest.raises(ValueError, match="gpu_layers"):
        offloaded_engine(decoder, decoder.spec.num_layers + 1)


def test_abort_frees_the_host_blocks_within_one_step(decoder):
    engine = offloaded_engine(decoder, 1)
    engine.step([prompt_job(decoder, "r1", 40, 50), prompt_job(decoder, "r2", 12, 50)])
    assert engine.kv.num_free_blocks < engine.kv.capacity_blocks
    result = engine.step([], ["r1", "missing"])
    assert result.aborted == ["r1"] and result.batch_size == 1 and engine.kv.num_used_rows == 1
    engine.step([], ["r2"])
    assert not engine.has_work and engine.kv.num_free_blocks == engine.kv.capacity_blocks
    assert engine.kv.can_allocate(engine.kv.staging_blocks * engine.kv.shape.block_size)


def test_the_plan_copies_exactly_the_attended_blocks_as_runs():
    kv = OffloadedKVCache(PagedKVShape(3, 2, 8, 4, 64, 4, 16), torch.float32, "cpu", gpu_layers=1,
                          staging_blocks=40)
    first, b = kv.allocate(20), kv.allocate(8)  # blocks 0-4, then 5-6
    kv.free(first)
    c = kv.allocate(28)  # blocks 0-4 again, then 7-8: two runs
    assert kv._row_blocks[c] == [0, 1, 2, 3, 4, 7, 8]

    def layers(*rows):
        return [torch.randn(2, 2, n, 8) for n in rows]

    kv.load(b, layers(5, 5, 5), 5)
    kv.load(c, layers(27, 26, 10), 30)
    rows = torch.tensor([b, c])
    plan = kv.plan_step(rows, kv.step_slots(rows, 7), windows=(None, None, 6))
    assert plan.copies == ((CopyRun(5, 0, 2), CopyRun(0, 2, 5), CopyRun(7, 7, 2)),  # full attention: all stored
                           (CopyRun(5, 0, 2), CopyRun(1, 3, 2)))  # window 6 over 10 rows: blocks 1-2 of c only
    assert plan.copy_bytes == 13 * 2 * (2 * 4 * 8 * 4)
    assert plan.host_blocks.tolist() == [[6, 6], [8, 2]] and plan.host_offsets.tolist() == [[1, 1], [2, 2]]
    assert plan.slots.slot_blocks[:, 1:].tolist() == [[1, 1], [8, 4]]
    assert plan.slots.block_tables.tolist() == [[0, 1, 0, 0, 0, 0, 0], [2, 3, 4, 5, 6, 7, 8]]
    assert merge_runs([CopyRun(3, 0, 2), CopyRun(5, 2, 1), CopyRun(6, 4, 1)]) == (CopyRun(3, 0, 3), CopyRun(6, 4, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_layers", [0, 1])
def test_on_cuda_the_prefetch_pipeline_matches_the_plain_engine(tiny_checkpoint_factory, gpu_layers):
    """Pinned host pools, the side stream and its events: same streams and KV as the plain eager engine."""
    path = tiny_checkpoint_factory("llama", "clip", 5, num_layers=4)
    decoder = load_decoder(load_spec(path), dtype="float32", device="cuda")
    plain, offloaded = plain_engine(decoder, cuda_graphs=False), offloaded_engine(decoder, gpu_layers)
    assert run_to_end(offloaded, jobs_for(decoder)) == run_to_end(plain, jobs_for(decoder))
    assert offloaded.kv.host_keys.is_pinned() and offloaded.kv.num_free_blocks == offloaded.kv.capacity_blocks
    for engine in (plain, offloaded):
        engine.step(jobs_for(decoder)[0])
        for _ in range(5):
            engine.step()
    for request_id, seq in plain.running.items():
        row = offloaded.running[request_id].row
        for layer in range(decoder.spec.num_layers):
            for want, got in zip(plain.kv.layer_rows(seq.row, layer), offloaded.kv.layer_rows(row, layer)):
                assert torch.equal(want.cpu(), got.cpu())
