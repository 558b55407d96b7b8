"""ProMoE expert offloading (ALGORITHMS.md §6c) on CPU fp32 with the tiny Mixtral checkpoint.

1. Greedy generation with offloaded experts equals the all-resident model bit for bit (logits and
   tokens) for every predictor, at cache rates 0.25 and 1.0, and for the on-demand baseline.
2-6. The protocol invariants, on a synthetic offloader driven by hand (copy_mode "manual") and on
   the worker thread: early preemption, HIGH before LOW with one chunk in flight, compute only at
   ready_chunk == 3, pins, occupancy, chunk-0 eviction, stable execution order, GoodPred, and no
   on-demand fetches for an oracle predictor with instant copies.
"""

from __future__ import annotations

import random
import threading
from typing import NamedTuple

import pytest
import torch

from epdserve.engine.expert_cache import CHUNKS, ExpertCache, Priority, execution_order
from epdserve.engine.expert_memory import HostExperts
from epdserve.engine.expert_offload import ExpertOffloadConfig, ExpertOffloader, OffloadStats, offload_experts
from epdserve.engine.expert_predictor import (
    LearnedPredictor,
    OraclePredictor,
    RandomPredictor,
    SkipGatePredictor,
    record_expert_trace,
    train_predictors,
)
from epdserve.engine.generation import generate
from epdserve.engine.sampler import SamplingParams
from epdserve.models.loader import load_decoder
from epdserve.models.spec import load_spec

pytestmark = pytest.mark.unit
GREEDY = SamplingParams(temperature=0.0)
PROMPT, NEW = 24, 10


class Reference(NamedTuple):
    embeds: torch.Tensor
    tokens: list[int]
    logits: list[torch.Tensor]
    trace: object


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("mixtral", "clip", 11, num_layers=4)  # 4 experts, top-2


def _decoder(model_dir):
    return load_decoder(load_spec(model_dir), dtype="float32", device="cpu")


def _generate(decoder, embeds: torch.Tensor, after_prefill=None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and every logits row the LM head produced (prefill's last row, then each step)."""
    logits: list[torch.Tensor] = []
    handle = decoder.lm_head.register_forward_hook(lambda module, args, out: logits.append(out.clone()))
    try:
        stream = generate(decoder, embeds, NEW, GREEDY, ignore_eos=True)
        tokens = [next(stream)]
        if after_prefill is not None:
            after_prefill()
        tokens += list(stream)
    finally:
        handle.remove()
    return tokens, logits


@pytest.fixture(scope="module")
def reference(model_dir) -> Reference:
    decoder = _decoder(model_dir)
    ids = torch.randint(0, decoder.spec.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        embeds = decoder.embed(ids)[0]
    with record_expert_trace(decoder) as trace:
        tokens, logits = _generate(decoder, embeds)
    assert len(trace.passes) == NEW and len(logits) == NEW
    return Reference(embeds, tokens, logits, trace)


@pytest.fixture(scope="module")
def learned_path(model_dir, tmp_path_factory):
    decoder = _decoder(model_dir)
    gen = torch.Generator().manual_seed(9)
    batches = [torch.randint(0, decoder.spec.vocab_size, (48,), generator=gen) for _ in range(6)]
    predictor, report = train_predictors(decoder, batches, distance=2, width=32, epochs=8, batch_size=64)
    assert report.samples == 6 * 48 and len(report.eval_accuracy) == decoder.spec.num_layers - 2
    assert all(0.0 <= a <= 1.0 for a in report.eval_accuracy + report.skip_gate_accuracy)
    path = tmp_path_factory.mktemp("moe-predictor") / "predictor.safetensors"
    predictor.save(path)
    return path


def _setup(name: str, rate: float, reference: Reference, learned_path, **overrides):
    if name == "learned":
        return ExpertOffloadConfig(cache_rate=rate, predictor="learned", predictor_path=str(learned_path),
                                   **overrides), None
    if name in ("oracle", "random"):
        predictor = OraclePredictor(reference.trace) if name == "oracle" else RandomPredictor(4, 2, seed=3)
        return ExpertOffloadConfig(cache_rate=rate, predictor="custom", **overrides), predictor
    if name == "on_demand":
        return ExpertOffloadConfig(cache_rate=rate, predictor="none", enable_prefetch=False, **overrides), None
    return ExpertOffloadConfig(cache_rate=rate, predictor=name, **overrides), None


def _assert_same_outputs(tokens, logits, reference: Reference) -> None:
    assert tokens == reference.tokens
    assert len(logits) == len(reference.logits)
    assert all(torch.equal(a, b) for a, b in zip(logits, reference.logits))


# ---- 1. outputs are independent of prediction quality -------------------------------------------------

@pytest.mark.parametrize("rate", [0.25, 1.0])
@pytest.mark.parametrize("name", ["none", "skip_gate", "learned", "oracle", "random", "on_demand"])
def test_offloaded_generation_is_bitwise_equal_to_resident(model_dir, reference, learned_path, name, rate):
    decoder = _decoder(model_dir)
    config, predictor = _setup(name, rate, reference, learned_path)
    with offload_experts(decoder, config, predictor=predictor) as offloader:
        tokens, logits = _generate(decoder, reference.embeds)
        stats = offloader.stats()
    _assert_same_outputs(tokens, logits, reference)
    assert stats.precise > 0 and 0.0 <= stats.good_pred <= 1.0 and 0.0 <= stats.hit_rate <= 1.0
    if rate == 1.0:  # every expert fits: nothing is ever copied after the initial fill
        assert stats.hit_rate == 1.0 and stats.bytes_copied == 0
    if name == "on_demand":
        assert stats.predicted == 0 and stats.partial == 0


def test_reoffloading_with_a_new_config_reuses_host_experts(model_dir, reference, learned_path):
    decoder = _decoder(model_dir)
    first = offload_experts(decoder, ExpertOffloadConfig(cache_rate=0.25, predictor="none", enable_prefetch=False))
    first.close()
    with pytest.raises(ValueError, match="already offloaded"):
        offload_experts(decoder, ExpertOffloadConfig())
    with offload_experts(decoder, ExpertOffloadConfig(cache_rate=0.5), host=first.host):
        tokens, logits = _generate(decoder, reference.embeds)
    _assert_same_outputs(tokens, logits, reference)


# ---- synthetic offloader (no model): L layers of E experts with tiny distinct weights -------------------

def _offloader(slots: int = 2, layers: int = 3, experts: int = 4, **config) -> ExpertOffloader:
    weights = [torch.arange(experts * CHUNKS * 6, dtype=torch.float32).reshape(experts, CHUNKS, 6) + 1000 * layer
               for layer in range(layers)]
    options = {"predictor": "none", "copy_mode": "manual", **config}
    return ExpertOffloader(HostExperts(weights, 2, 3), ExpertOffloadConfig(cache_rate=slots / experts, **options),
                           device="cpu").start()


def _assert_slot_holds(offloader: ExpertOffloader, layer: int, expert: int) -> None:
    weights = offloader.slots.weights(layer, offloader.cache.slot_of(layer, expert))
    for chunk, w in enumerate(weights):
        assert torch.equal(w.reshape(-1), offloader.host.chunk(layer, expert, chunk))


# ---- 2. early preemption; HIGH before LOW; one chunk in flight ------------------------------------------

def test_push_precise_removes_low_tasks_of_its_layer_only():
    offloader = _offloader()
    offloader.push_predicted(1, [2, 3])
    offloader.push_predicted(2, [3])
    order = offloader.push_precise(1, [0, 3])
    queued = offloader.queue_snapshot()
    assert not [t for t in queued if t.layer == 1 and t.priority is Priority.LOW]
    assert [t for t in queued if t.priority is Priority.LOW] == [(2, 3, c, Priority.LOW) for c in range(CHUNKS)]
    assert [t for t in queued if t.priority is Priority.HIGH] == [(1, 3, c, Priority.HIGH) for c in range(CHUNKS)]
    assert order == [0, 3] and offloader.stats().preempted_tasks == 6


def test_high_task_is_never_behind_a_low_task():
    offloader = _offloader()
    offloader.push_predicted(2, [2, 3])
    offloader.push_precise(1, [2])
    offloader.push_predicted(2, [3])
    priorities = [t.priority for t in offloader.queue_snapshot()]
    assert priorities == sorted(priorities)  # every HIGH first
    offloader.run_pending(1)
    assert offloader.ready_chunk(1, 2) == 1 and offloader.ready_chunk(2, 2) == 0


def test_worker_runs_one_chunk_at_a_time_and_high_preempts_queued_low():
    offloader = _offloader(copy_mode="thread")
    copied, active, most = [], [0], [0]
    started, go = threading.Event(), threading.Event()
    inner = offloader._copier.copy

    def gated_copy(task, slot):  # the first copy stays in flight until the HIGH tasks are queued
        active[0] += 1
        most[0] = max(most[0], active[0])
        copied.append(task)
        if len(copied) == 1:
            started.set()
            go.wait(5)
        inner(task, slot)
        active[0] -= 1

    offloader._copier.copy = gated_copy
    offloader.push_predicted(2, [2, 3])  # six LOW chunks for layer 2
    assert started.wait(5)
    offloader.push_precise(1, [2])
    go.set()
    offloader.acquire(1, 2)
    offloader.release(1, 2)
    offloader.close()
    assert most[0] == 1
    assert copied[0] == (2, 2, 0, Priority.LOW)  # the one chunk in flight when HIGH arrived
    assert copied[1:4] == [(1, 2, c, Priority.HIGH) for c in range(CHUNKS)]


# ---- 3. compute only at ready_chunk == 3; pins ---------------------------------------------------------

def test_expert_is_computed_only_when_fully_copied(model_dir, reference):
    decoder = _decoder(model_dir)
    offloader = offload_experts(decoder, ExpertOffloadConfig(cache_rate=0.25, prefetch_distance=1))
    acquire, acquired = offloader.acquire, []

    def checked_acquire(layer: int, expert: int):
        weights = acquire(layer, expert)
        assert offloader.ready_chunk(layer, expert) == CHUNKS
        _assert_slot_holds(offloader, layer, expert)
        acquired.append((layer, expert))
        return weights

    offloader.acquire = checked_acquire
    with offloader:
        tokens, logits = _generate(decoder, reference.embeds)
    _assert_same_outputs(tokens, logits, reference)
    assert len(acquired) == offloader.stats().precise > 0


def test_pinned_expert_is_never_evicted_before_its_compute():
    offloader = _offloader(slots=1)  # slot 0 of every layer holds expert 0
    assert offloader.push_precise(0, [2, 0]) == [0, 2]  # cached first
    assert offloader.run_pending() == 0  # chunk 0 of expert 2 has no unpinned victim
    assert offloader.resident(0) == [0] and offloader.ready_chunk(0, 0) == CHUNKS
    offloader.acquire(0, 0)
    offloader.release(0, 0)
    offloader.acquire(0, 2)  # manual mode: the waiting caller runs the copies
    _assert_slot_holds(offloader, 0, 2)
    assert offloader.resident(0) == [2] and offloader.ready_chunk(0, 0) == 0


# ---- 4. occupancy; chunk-0 eviction ----------------------------------------------------------------------

def test_chunk0_copy_evicts_exactly_one_expert_and_resets_it():
    offloader = _offloader(slots=2)
    offloader.push_predicted(0, [2, 3])
    while offloader.queue_snapshot():
        task = offloader.queue_snapshot()[0]
        before, evictions = offloader.resident(0), offloader.stats().evictions
        offloader.run_pending(1)
        after = offloader.resident(0)
        if task.chunk == 0:
            (evicted,) = set(before) - set(after)
            assert set(after) - set(before) == {task.expert} and offloader.stats().evictions == evictions + 1
            assert offloader.ready_chunk(0, evicted) == 0 and offloader.cache.slot_of(0, evicted) is None
        else:
            assert after == before
    assert sorted(offloader.resident(0)) == [2, 3]
    _assert_slot_holds(offloader, 0, 2)
    _assert_slot_holds(offloader, 0, 3)


def test_occupancy_never_exceeds_capacity_under_random_operations():
    rng = random.Random(4)
    offloader = _offloader(slots=2, layers=3, experts=5)
    for _ in range(300):
        layer, experts = rng.randrange(3), rng.sample(range(5), rng.randint(1, 4))
        if rng.random() < 0.5:
            offloader.push_predicted(layer, experts)
        else:
            for e in offloader.push_precise(layer, experts):
                offloader.acquire(layer, e)
                _assert_slot_holds(offloader, layer, e)
                offloader.release(layer, e)
        offloader.run_pending(rng.randint(0, 4))
        for layer in range(3):
            resident = offloader.resident(layer)
            assert len(resident) == len(set(resident)) == offloader.capacity
            assert all(0 <= offloader.ready_chunk(layer, e) <= CHUNKS for e in range(5))


# ---- 5. execution order ------------------------------------------------------------------------------

def test_execution_order_is_cached_then_partial_then_not_started_each_stable():
    cache = ExpertCache(num_layers=1, num_experts=6, capacity=4)  # slots hold 0, 1, 2, 3
    cache.claim(0, 4)  # evicts 0 (least recently used)
    cache.advance(0, 4, 0)
    cache.advance(0, 4, 1)  # expert 4: two chunks
    cache.claim(0, 5)  # evicts 1
    cache.advance(0, 5, 0)  # expert 5: one chunk
    assert execution_order(cache, 0, [5, 0, 3, 4, 1, 2]) == [3, 2, 5, 4, 0, 1]


def test_on_demand_baseline_keeps_gate_order_and_fetches_at_compute_time():
    offloader = _offloader(slots=1, enable_prefetch=False)
    assert offloader.push_precise(0, [3, 0, 2]) == [0, 2, 3]
    assert offloader.queue_snapshot() == []
    for e in (0, 2, 3):
        offloader.acquire(0, e)
        _assert_slot_holds(offloader, 0, e)
        offloader.release(0, e)
    stats = offloader.stats()
    assert (stats.hits, stats.on_demand, stats.evictions) == (1, 2, 2)


# ---- 6. metrics ------------------------------------------------------------------------------------------

def test_good_pred_is_in_unit_interval_and_monotone():
    base = OffloadStats(predicted=10, predicted_used=4, predicted_ready=5)
    assert base.good_pred == pytest.approx(0.4 * 0.5)
    assert OffloadStats(predicted=10, predicted_used=6, predicted_ready=5).good_pred > base.good_pred
    assert OffloadStats(predicted=10, predicted_used=4, predicted_ready=7).good_pred > base.good_pred
    assert OffloadStats().good_pred == 0.0
    for used in range(11):
        for ready in range(11):
            assert 0.0 <= OffloadStats(predicted=10, predicted_used=used, predicted_ready=ready).good_pred <= 1.0


def test_oracle_with_instant_copies_never_fetches_on_demand(model_dir, reference):
    decoder = _decoder(model_dir)
    config = ExpertOffloadConfig(cache_rate=0.5, predictor="custom", copy_mode="inline")  # 2 slots = top-k
    with offload_experts(decoder, config, predictor=OraclePredictor(reference.trace)) as offloader:
        tokens, logits = _generate(decoder, reference.embeds, after_prefill=offloader.reset_stats)
        stats = offloader.stats()
    _assert_same_outputs(tokens, logits, reference)
    assert stats.precise > 0 and stats.hit_rate == 1.0
    assert (stats.on_demand, stats.partial, stats.stalls, stats.stall_seconds) == (0, 0, 0, 0.0)
    assert stats.accuracy == stats.fetch_rate == stats.good_pred == 1.0


# ---- predictors and config -------------------------------------------------------------------------------

def test_learned_predictor_round_trips_through_safetensors(model_dir, learned_path):
    from safetensors import safe_open

    with safe_open(str(learned_path), framework="pt") as f:
        assert f.metadata()["format"] == "epdserve-moe-predictor-v1"
    predictor = LearnedPredictor.load(learned_path)
    again = LearnedPredictor.load(learned_path)
    hidden = torch.randn(3, predictor.hidden_size, generator=torch.Generator().manual_seed(0))
    scores = predictor.priority(0, 2, 0, hidden)
    assert torch.equal(scores, again.priority(0, 2, 0, hidden)) and scores.shape == (4,)
    assert 2 <= int((scores > 0).sum()) <= 4
    assert predictor.priority(2, 4, 0, hidden) is None  # no model past the last layer
    with pytest.raises(ValueError, match="distance"):
        offload_experts(_decoder(model_dir), ExpertOffloadConfig(
            prefetch_distance=1, predictor="learned", predictor_path=str(learned_path)))


def test_skip_gate_predicts_the_target_gates_top_k(model_dir):
    decoder = _decoder(model_dir)
    gates = [layer.block_sparse_moe.gate for layer in decoder.layers]
    hidden = torch.randn(1, decoder.spec.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores = SkipGatePredictor(gates, 2).priority(0, 2, 0, hidden)
        top = set(torch.topk(gates[2](hidden)[0], 2).indices.tolist())
    assert set(torch.nonzero(scores).flatten().tolist()) == top


@pytest.mark.parametrize("options,message", [
    ({"cache_rate": 0.5, "cache_bytes": 100}, "not both"),
    ({"cache_rate": 0.0}, "cache_rate"),
    ({"prefetch_distance": 0}, "prefetch_distance"),
    ({"predictor": "magic"}, "not one of"),
    ({"predictor": "learned"}, "predictor_path"),
    ({"predictor_path": "x.safetensors"}, "predictor_path"),
    ({"enable_prefetch": False}, "on-demand"),
    ({"copy_mode": "async"}, "copy_mode"),
])
def test_config_rejects_contradictions(options, message):
    with pytest.raises(ValueError, match=message):
        ExpertOffloadConfig(**options)


def test_budget_below_one_expert_per_layer_and_closed_offloader_are_errors():
    with pytest.raises(ValueError, match="less than one expert"):
        _offloader(slots=0.5)
    offloader = _offloader(copy_mode="thread")
    offloader.close()
    with pytest.raises(RuntimeError, match="closed"):
        offloader.push_precise(0, [1])
    assert not offloader._worker.is_alive()
