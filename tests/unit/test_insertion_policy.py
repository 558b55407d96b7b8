"""Insertion policies for local prefill in the decode service, judged on a simulated clock
(ALGORITHMS.md §2(c) items 2, 3 and 5; real mixes from ../shared/traces when present)."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import random
import time

import pytest

from services.decode.insertion import (
    DECODE,
    FcfsInsertion,
    InsertionConfig,
    LagrangianInsertion,
    QueueState,
    SlotView,
    StepCosts,
    StepDecision,
    WaitingView,
    admission_order,
    build_insertion_policy,
)
from services.decode.schedule_sim import SimRequest, SimResult, scale_to_load, simulate

pytestmark = pytest.mark.unit
TRACES = pathlib.Path(__file__).resolve().parents[3] / "shared" / "traces"
B = 32
# A realistic shape: decode 20 ms + 0.2 ms per running sequence, prefill 15 ms + 0.08 ms per token.
COSTS = StepCosts(prefill_fixed_s=0.015, prefill_per_token_s=0.00008, decode_fixed_s=0.020, decode_per_seq_s=0.0002)


def synthetic_mix(count: int, seed: int) -> list[SimRequest]:
    """Azure-conversation-like: Poisson arrivals (rescaled later), lognormal prompts (median 1000)
    and outputs (median 130, heavy tail)."""
    rng = random.Random(seed)
    clock, mix = 0.0, []
    for _ in range(count):
        clock += rng.expovariate(1.0)
        prompt = min(4096, max(16, int(rng.lognormvariate(math.log(1000), 0.6))))
        output = min(1024, max(1, int(rng.lognormvariate(math.log(130), 1.0))))
        mix.append(SimRequest(clock, prompt, output))
    return mix


def azure_window(start: int = 1000, count: int = 400) -> list[SimRequest]:
    from tuner.traces import read_trace

    rows = read_trace(TRACES / "azure_llm_conv_2023.csv")[start:start + count]
    return [SimRequest(r.arrival_s, r.context_tokens, max(1, r.generated_tokens)) for r in rows]


def random_state(rng: random.Random, *, running: int | None = None, waiting: int | None = None) -> QueueState:
    n = rng.randint(0, B) if running is None else running
    q = rng.randint(0, 3 * B) if waiting is None else waiting
    slots = tuple(SlotView(rng.randint(0, 500), rng.choice([None, rng.randint(1, 800)])) for _ in range(n))
    queue = tuple(WaitingView(rng.randint(1, 4000), float(i), rng.choice([None, rng.randint(1, 800)]))
                  for i in range(q))
    return QueueState(B, slots, queue)


def both_policies() -> list:
    return [FcfsInsertion(), LagrangianInsertion(COSTS), LagrangianInsertion(COSTS, InsertionConfig(
        lam=1.0, order="longest-first")), LagrangianInsertion(COSTS, InsertionConfig(horizon="fixed"))]


# --- the decision rule (§2(c) item 3) ---------------------------------------------------------

@pytest.mark.parametrize("policy", both_policies(), ids=lambda p: f"{p.name}")
def test_degenerate_cases(policy):
    rng = random.Random(0)
    for _ in range(300):
        empty = random_state(rng, running=0, waiting=rng.randint(1, 80))
        assert policy.decide(empty).prefill == admission_order(empty.waiting, B, policy.config.order)
        assert policy.decide(random_state(rng, running=B)) == DECODE
        assert policy.decide(random_state(rng, waiting=0)) == DECODE


@pytest.mark.parametrize("policy", both_policies(), ids=lambda p: f"{p.name}")
def test_admits_at_most_the_free_slots_once_each(policy):
    rng = random.Random(1)
    for _ in range(500):
        state = random_state(rng)
        picks = policy.decide(state).prefill
        assert len(set(picks)) == len(picks) <= state.free_slots
        assert all(0 <= i < len(state.waiting) for i in picks)


def test_dearer_prefill_never_turns_decode_into_prefill():
    rng = random.Random(2)
    decodes = 0
    for _ in range(3000):
        state = random_state(rng, running=rng.randint(1, B - 1), waiting=rng.randint(1, 40))
        costs = StepCosts(rng.uniform(0, 0.05), rng.uniform(0, 0.0003), rng.uniform(0.005, 0.04), rng.uniform(0, 0.001))
        config = InsertionConfig(lam=rng.choice([1.0, 8.0, 32.0]), order=rng.choice(["fcfs", "longest-first"]))
        if LagrangianInsertion(costs, config).decide(state).is_prefill:
            continue
        decodes += 1
        a_p = costs.prefill_fixed_s * rng.uniform(1, 5) + rng.uniform(0, 0.01)
        b_p = costs.prefill_per_token_s * rng.uniform(1, 5)
        dearer = dataclasses.replace(costs, prefill_fixed_s=a_p, prefill_per_token_s=b_p)
        assert LagrangianInsertion(dearer, config).decide(state) == DECODE
    assert decodes > 300  # the property was exercised, not vacuous


def test_rule_matches_the_formula():
    running = tuple(SlotView(10, remaining) for remaining in (40, 5, 90))
    waiting = (WaitingView(1000, 0.0, 50), WaitingView(200, 1.0, 300))
    state = QueueState(5, running, waiting)
    stall = 3 * COSTS.prefill_s([1000, 200])
    for lam in (1.0, 8.0, 32.0, 64.0):
        idle = lam * 2 * 5 * COSTS.decode_s(3)
        assert LagrangianInsertion(COSTS, InsertionConfig(lam=lam)).decide(state).is_prefill == (idle >= stall)


def test_queue_orders_and_horizons():
    waiting = (WaitingView(10, 0.0, 5), WaitingView(10, 1.0, None), WaitingView(10, 2.0, 50), WaitingView(10, 3.0, 5))
    assert admission_order(waiting, 3, "fcfs") == (0, 1, 2)
    assert admission_order(waiting, 3, "longest-first") == (2, 0, 3)
    assert admission_order(waiting, 3, "shortest-first") == (0, 3, 2)
    policy = LagrangianInsertion(COSTS, InsertionConfig(expected_output_tokens=200.0, horizon_steps=7.0))
    assert policy.horizon((SlotView(3, 40), SlotView(3, None), SlotView(9, 12))) == 12.0
    assert policy.horizon((SlotView(3, None),) * 4) == 50.0
    fixed = LagrangianInsertion(COSTS, InsertionConfig(horizon="fixed", horizon_steps=7.0))
    assert fixed.horizon((SlotView(3, 1),)) == 7.0


def test_decide_is_cheap():
    rng = random.Random(3)
    states = [random_state(rng, running=rng.randint(1, B - 1), waiting=256) for _ in range(200)]
    policy = LagrangianInsertion(COSTS, InsertionConfig(order="longest-first"))
    start = time.perf_counter()
    for _ in range(10):
        for state in states:
            policy.decide(state)
    assert (time.perf_counter() - start) / 2000 < 200e-6  # typically ~10 us; generous for slow CI


def test_registry_config_and_fit():
    assert isinstance(build_insertion_policy("lagrangian", COSTS), LagrangianInsertion)
    assert isinstance(build_insertion_policy("fcfs", COSTS), FcfsInsertion)
    with pytest.raises(ValueError, match="not one of"):
        build_insertion_policy("sjf", COSTS)
    for bad in ({"lam": 0.0}, {"horizon": "max"}, {"order": "random"}, {"horizon_steps": -1.0}):
        with pytest.raises(ValueError):
            InsertionConfig(**bad)
    with pytest.raises(ValueError, match=">= 0"):
        StepCosts(-0.001, 0.0, 0.02, 0.0)
    rng = random.Random(4)
    prefill = [(t, COSTS.prefill_s([t]) + rng.gauss(0, 1e-4)) for t in range(64, 4096, 64)]
    decode = [(n, COSTS.decode_s(n) + rng.gauss(0, 1e-5)) for n in range(1, B + 1) for _ in range(3)]
    fitted = StepCosts.fit(prefill, decode)
    for field in dataclasses.fields(COSTS):
        assert getattr(fitted, field.name) == pytest.approx(getattr(COSTS, field.name), rel=0.05, abs=1e-4)
    with pytest.raises(ValueError, match="two distinct"):
        StepCosts.fit([(100, 0.02), (100, 0.021)], decode)


# --- the simulated engine (§2(c) items 2 and 5) -------------------------------------------------

def check_schedule(requests: list[SimRequest], result: SimResult) -> None:
    admitted_at: dict[int, int] = {}
    for k, step in enumerate(result.steps):
        assert step.occupied_after <= B and step.decoding <= B
        if step.admitted:  # a prefill: no decode in the same iteration
            assert step.decoding == 0
            admitted_at.update((i, k) for i in step.admitted)
        else:
            assert step.decoding > 0
    assert sorted(admitted_at) == list(range(len(requests)))  # each prefilled exactly once
    assert sum(step.decoding for step in result.steps) == sum(r.output_tokens for r in requests)
    for i, request in enumerate(requests):
        prefill = result.steps[admitted_at[i]]
        assert prefill.start_s >= request.arrival_s
        finish = request.arrival_s + result.latency_s[i]
        decodes = [s for s in result.steps[admitted_at[i] + 1:] if not s.admitted and s.start_s < finish - 1e-9]
        assert len(decodes) == request.output_tokens  # it decodes in every decode step until it is done
        assert 0 < result.ttft_s[i] <= result.latency_s[i]


@pytest.mark.parametrize("policy", both_policies(), ids=lambda p: f"{p.name}")
@pytest.mark.parametrize("load", [0.5, 1.2])
def test_schedule_invariants(policy, load):
    requests = scale_to_load(synthetic_mix(120, seed=5), COSTS, B, load)
    result = simulate(requests, COSTS, policy, B)
    check_schedule(requests, result)
    assert 0 < result.utilisation <= 1
    again = simulate(requests, COSTS, policy, B)
    assert again == result  # deterministic: same trace and profile, same schedule


def test_blind_outputs_and_contract_violations():
    requests = scale_to_load(synthetic_mix(80, seed=6), COSTS, B, 1.0)
    check_schedule(requests, simulate(requests, COSTS, LagrangianInsertion(COSTS), B, reveal_outputs=False))

    class Greedy:
        name = "greedy"

        def decide(self, state: QueueState) -> StepDecision:
            return StepDecision(tuple(range(len(state.waiting)))) if state.waiting else DECODE

    class Lazy:
        name = "lazy"

        def decide(self, state: QueueState) -> StepDecision:
            return DECODE

    burst = [SimRequest(0.0, 10, 3)] * (B + 1)
    with pytest.raises(ValueError, match="free slots"):
        simulate(burst, COSTS, Greedy(), B)
    with pytest.raises(ValueError, match="nothing running"):
        simulate(burst, COSTS, Lazy(), B)
    with pytest.raises(ValueError, match="output_tokens"):
        simulate([SimRequest(0.0, 10, 0)], COSTS, FcfsInsertion(), B)


# --- the headline: the tuned rule against vLLM-style FCFS ---------------------------------------

def compare(requests: list[SimRequest]) -> tuple[SimResult, SimResult]:
    return simulate(requests, COSTS, FcfsInsertion(), B), simulate(requests, COSTS, LagrangianInsertion(COSTS), B)


def mixes() -> list:
    trace = pytest.mark.skipif(not TRACES.is_dir(), reason="../shared/traces not present")
    return [pytest.param(lambda: synthetic_mix(400, seed=0), id="synthetic"),
            pytest.param(azure_window, id="azure-conv", marks=trace)]


@pytest.mark.parametrize("make_mix", mixes())
def test_lagrangian_beats_fcfs_on_a_backlogged_client(make_mix):
    """Offered load 1.2x the spec's capacity estimate 1/mean(w_i), so a queue stands for most of the
    window: waiting a few steps lets the next freed slot join the same prefill, which saves a_p."""
    fcfs, lagrangian = compare(scale_to_load(make_mix(), COSTS, B, 1.2))
    assert lagrangian.utilisation > fcfs.utilisation * 1.003
    assert lagrangian.mean_latency_s < fcfs.mean_latency_s * 0.98
    assert lagrangian.makespan_s < fcfs.makespan_s


@pytest.mark.parametrize("make_mix", mixes())
def test_lagrangian_beats_fcfs_on_an_offline_batch(make_mix):
    """The paper's setting: every request known at t = 0."""
    requests = [dataclasses.replace(r, arrival_s=0.0) for r in make_mix()]
    fcfs, lagrangian = compare(requests)
    assert lagrangian.utilisation > fcfs.utilisation * 1.003
    assert lagrangian.mean_latency_s < fcfs.mean_latency_s * 0.99
    assert lagrangian.makespan_s < fcfs.makespan_s


@pytest.mark.parametrize("make_mix", mixes())
def test_near_capacity_lagrangian_cuts_latency_without_costing_utilisation(make_mix):
    """At load 1.0 the queue drains often: fewer prefill stalls cut mean latency, but the utilisation
    gain is within noise (+-0.7% across trace windows), so only "no worse than 1%" is claimed."""
    fcfs, lagrangian = compare(scale_to_load(make_mix(), COSTS, B, 1.0))
    assert lagrangian.mean_latency_s < fcfs.mean_latency_s * 0.99
    assert lagrangian.utilisation > fcfs.utilisation * 0.99
