"""Router admission (Mooncake early rejection): the predictions, the decisions, and the simulated-clock
claim that predicting the decode load at join time beats judging the load of now."""

from __future__ import annotations

import pathlib

import pytest

from services.router.admission import (
    SLO,
    AdmissionConfig,
    AdmissionRequest,
    CurrentLoadAdmission,
    DecodeModel,
    DecodeState,
    IncomingSeq,
    OutputLengthModel,
    PredictiveAdmission,
    PrefillModel,
    PrefillState,
    RunningSeq,
    build_admission_policy,
    current_tpot_s,
    predict_decode_load,
    predict_tpot,
    predict_ttft,
)
from services.router.admission_sim import (
    ClusterConfig,
    Scenario,
    SimRequest,
    compare,
    simulate,
    synthetic_overload,
    synthetic_scenario,
    trace_scenario,
)

pytestmark = pytest.mark.unit
TRACE = pathlib.Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake_conversation.jsonl"

PREFILL = PrefillModel(fixed_s=0.1, per_token_s=1e-3)          # 1000 tokens: 1.1 s
DECODE = DecodeModel(fixed_s=0.02, per_seq_s=1e-3)             # batch 10: 30 ms a step
SLOS = SLO(ttft_s=5.0, tpot_s=0.05)


def request(prompt: int = 1000, uncached: int | None = None, expected: float = 100) -> AdmissionRequest:
    return AdmissionRequest(prompt, prompt if uncached is None else uncached, expected)


def busy_decode(sequences: int, remaining: float, capacity: int = 64) -> DecodeState:
    return DecodeState(DECODE, capacity, running=tuple(RunningSeq(remaining) for _ in range(sequences)))


# predictions


def test_ttft_is_backlog_plus_own_prefill():
    state = PrefillState(PREFILL, queued_requests=2, queued_tokens=3000, busy_until_s=12.5)
    # in progress ends in 2.5 s; queued: 2 * 0.1 + 3000 * 1e-3 = 3.2 s; own: 0.1 + 0.5 = 0.6 s
    assert predict_ttft(request(1000, uncached=500), state, now=10.0) == pytest.approx(2.5 + 3.2 + 0.6)
    assert predict_ttft(request(1000), PrefillState(PREFILL, busy_until_s=3.0), now=10.0) == pytest.approx(1.1)


def test_running_sequences_that_finish_before_the_join_are_gone_at_join_time():
    decode = busy_decode(40, remaining=20)      # 40 running, each done in 20 steps (about 1.2 s)
    now, join = 0.0, 5.0
    assert predict_decode_load(decode, join, now) == 0
    assert predict_tpot(request(), decode, join, now) == pytest.approx(DECODE.step_s(1))
    assert current_tpot_s(decode) == pytest.approx(DECODE.step_s(40))   # the current-load view: full


def test_sequences_still_in_prefill_count_from_their_join():
    incoming = (IncomingSeq(join_at_s=2.0, remaining_tokens=1000), IncomingSeq(join_at_s=8.0, remaining_tokens=1000))
    decode = DecodeState(DECODE, 64, running=(RunningSeq(1000),), incoming=incoming)
    assert predict_decode_load(decode, 1.0, now=0.0) == 1
    assert predict_decode_load(decode, 5.0, now=0.0) == 2
    assert predict_decode_load(decode, 9.0, now=0.0) == 3
    assert current_tpot_s(decode) == pytest.approx(DECODE.step_s(1))   # blind to both


def test_outcomes_weight_the_predicted_load_and_overdue_joins_count_now():
    decode = DecodeState(DECODE, 64, running=(RunningSeq((10.0, 10_000.0)),),
                         incoming=(IncomingSeq(join_at_s=-1.0, remaining_tokens=10_000),))
    # one running sequence: half its outcomes leave after 10 steps; the overdue one joins at now
    assert predict_decode_load(decode, 5.0, now=0.0, token_s=0.05) == pytest.approx(1.5)
    assert predict_decode_load(decode, 0.1, now=0.0, token_s=0.05) == pytest.approx(2.0)


def test_over_capacity_sequences_take_turns():
    decode = busy_decode(20, remaining=1000, capacity=10)
    assert predict_tpot(request(0, expected=0), decode, 0.0, 0.0) == pytest.approx(DECODE.step_s(10) * 21 / 10)


# decisions


def test_light_load_is_admitted_on_the_best_replicas():
    prefill = [PrefillState(PREFILL, 3, 3000, busy_until_s=1.0), PrefillState(PREFILL)]
    decode = [busy_decode(30, remaining=1000), busy_decode(2, remaining=1000)]
    for policy in (PredictiveAdmission(AdmissionConfig(SLOS)), CurrentLoadAdmission(AdmissionConfig(SLOS))):
        decision = policy.decide(request(), prefill, decode, now=0.0)
        assert decision.admit and decision.rejected_by == () and decision.retry_after_s == 0
        assert (decision.prefill_index, decision.decode_index) == (1, 1)
        assert decision.predicted_ttft_s == pytest.approx(1.1)
        assert decision.predicted_tpot_s == pytest.approx(DECODE.step_s(3))


def test_prefill_overload_is_rejected_naming_ttft_with_a_bounded_retry():
    config = AdmissionConfig(SLOS, headroom=0.1, min_retry_s=0.5, max_retry_s=30.0)
    prefill = [PrefillState(PREFILL, queued_requests=10, queued_tokens=6000)]   # 7 s of backlog
    decision = PredictiveAdmission(config).decide(request(), prefill, [busy_decode(1, 10)], now=0.0)
    assert not decision.admit and decision.rejected_by == ("ttft",)
    assert "TTFT" in decision.reason
    assert decision.retry_after_s == pytest.approx(8.1 - 4.5)   # until the backlog drains under 0.9 x 5 s


def test_decode_overload_is_rejected_naming_tpot_with_a_bounded_retry():
    config = AdmissionConfig(SLOS, min_retry_s=0.5, max_retry_s=30.0)
    decode = [busy_decode(60, remaining=200)]         # step 80 ms > 45 ms for about 16 s
    for policy in (PredictiveAdmission(config), CurrentLoadAdmission(config)):
        decision = policy.decide(request(), [PrefillState(PREFILL)], decode, now=0.0)
        assert not decision.admit and decision.rejected_by == ("tpot",)
        assert "TPOT" in decision.reason
        assert 0.5 <= decision.retry_after_s <= 30.0 and decision.retry_after_s > 1.0
    never = [DecodeState(DecodeModel(0.1, 0.0), 8)]  # one sequence alone is over the SLO
    decision = PredictiveAdmission(config).decide(request(), [PrefillState(PREFILL)], never, now=0.0)
    assert decision.retry_after_s == 30.0


def test_both_slos_named_when_both_fail_and_a_zero_slo_is_not_checked():
    prefill = [PrefillState(PREFILL, queued_requests=10, queued_tokens=6000)]
    decode = [busy_decode(60, remaining=5000)]
    both = PredictiveAdmission(AdmissionConfig(SLOS)).decide(request(), prefill, decode, now=0.0)
    assert both.rejected_by == ("ttft", "tpot")
    for slo in (SLO(ttft_s=0, tpot_s=0.05), SLO(ttft_s=5.0, tpot_s=0)):
        decision = PredictiveAdmission(AdmissionConfig(slo)).decide(request(), prefill, decode, now=0.0)
        assert decision.rejected_by == (("tpot",) if slo.ttft_s == 0 else ("ttft",))
    unchecked = PredictiveAdmission(AdmissionConfig(SLO())).decide(request(), prefill, decode, now=0.0)
    assert unchecked.admit


def test_headroom_rejects_a_prediction_just_under_the_slo():
    decode = [busy_decode(26, remaining=10_000)]      # step with the request: 47 ms, SLO 50 ms
    tight = PredictiveAdmission(AdmissionConfig(SLOS, headroom=0.1))
    loose = PredictiveAdmission(AdmissionConfig(SLOS, headroom=0.0))
    assert not tight.decide(request(0, expected=0), [PrefillState(PREFILL)], decode, now=0.0).admit
    assert loose.decide(request(0, expected=0), [PrefillState(PREFILL)], decode, now=0.0).admit


def test_predictive_admits_into_a_draining_replica_and_refuses_one_about_to_flood():
    prefill = [PrefillState(PREFILL, queued_requests=2, queued_tokens=2000)]    # join in about 3.3 s
    config = AdmissionConfig(SLOS)
    draining = [busy_decode(40, remaining=30)]                                     # gone in < 2 s
    assert PredictiveAdmission(config).decide(request(), prefill, draining, now=0.0).admit
    assert not CurrentLoadAdmission(config).decide(request(), prefill, draining, now=0.0).admit
    landing = tuple(IncomingSeq(join_at_s=1.0, remaining_tokens=500) for _ in range(40))
    flooding = [DecodeState(DECODE, 64, incoming=landing)]                       # empty now, 40 land at 1 s
    assert not PredictiveAdmission(config).decide(request(), prefill, flooding, now=0.0).admit
    assert CurrentLoadAdmission(config).decide(request(), prefill, flooding, now=0.0).admit


def test_inputs_are_validated_and_policies_registered():
    with pytest.raises(ValueError):
        SLO(ttft_s=-1.0)
    with pytest.raises(ValueError):
        AdmissionRequest(prompt_tokens=10, uncached_tokens=11, expected_output_tokens=5)
    with pytest.raises(ValueError):
        AdmissionConfig(SLOS, headroom=1.0)
    with pytest.raises(ValueError):
        RunningSeq(())
    with pytest.raises(ValueError):
        PredictiveAdmission(AdmissionConfig(SLOS)).decide(request(), [], [busy_decode(1, 1)], now=0.0)
    assert build_admission_policy("predictive", AdmissionConfig(SLOS)).name == "predictive"
    assert build_admission_policy("current-load", AdmissionConfig(SLOS)).name == "current-load"
    with pytest.raises(ValueError, match="not one of"):
        build_admission_policy("random", AdmissionConfig(SLOS))


# the router's output-length model


def test_output_length_model_from_samples():
    model = OutputLengthModel.from_samples([100, 200, 300, 400])
    assert model.mean() == pytest.approx(250)
    assert model.expected_remaining(150) == pytest.approx(300 - 150)    # mean of 200, 300, 400 less 150
    assert model.remaining_quantiles(150, count=3) == (50.0, 150.0, 250.0)
    assert model.remaining_quantiles(400) == (1.0,)


def test_kaplan_meier_corrects_the_early_short_bias():
    # early on only the short requests have finished; the running ones are known to be longer
    naive = OutputLengthModel.from_samples([50] * 10)
    censored = OutputLengthModel.from_observations([50] * 10, [300] * 10, tail_floor=256)
    assert naive.mean() == 50
    assert censored.mean() == pytest.approx(0.5 * 50 + 0.5 * 301)
    assert censored.expected_remaining(100) == pytest.approx(201)
    with pytest.raises(ValueError):
        OutputLengthModel.from_observations([], [])


# the simulated clock


def test_simulation_runs_every_admitted_request_to_its_length_within_capacity():
    requests = [SimRequest(0.1 * i, 200 + 10 * i, 1 + (i % 7) * 20) for i in range(60)]
    cluster = ClusterConfig(PrefillModel(0.01, 1e-4), DecodeModel(0.01, 1e-3), prefill_replicas=2,
                            decode_capacity=8, warmup_s=0.0)
    slo = SLO(ttft_s=2.0, tpot_s=0.05)
    report = simulate(requests, cluster, PredictiveAdmission(AdmissionConfig(slo)), slo)
    assert report.arrivals == 60 and report.completed == report.arrivals - report.rejected
    assert max(report.load_series) <= 8
    assert report == simulate(requests, cluster, PredictiveAdmission(AdmissionConfig(slo)), slo)


def test_synthetic_overload_is_seeded():
    assert synthetic_overload(50, 3.0, seed=1) == synthetic_overload(50, 3.0, seed=1)
    assert synthetic_overload(50, 3.0, seed=1) != synthetic_overload(50, 3.0, seed=2)


def _assert_prediction_wins(baseline, predictive, *, std_ratio: float, attainment: float) -> None:
    assert baseline.arrivals == predictive.arrivals
    assert predictive.rejected < baseline.rejected                       # fewer rejections
    assert predictive.load_std < std_ratio * baseline.load_std           # a steadier decode load
    assert predictive.longest_admit_gap_s < 0.5 * baseline.longest_admit_gap_s   # no reject-all phases
    assert predictive.slo_attainment >= attainment > baseline.slo_attainment
    assert predictive.goodput_rps > baseline.goodput_rps


def test_prediction_beats_current_load_on_the_synthetic_overload():
    # measured (2026-11-29): rejected 840 vs 821, attainment 0.882 vs 0.998, batch std 10.5 vs 5.6,
    # longest admit gap 33.4 s vs 3.4 s (docs/BENCHMARKS.md)
    baseline, predictive = compare(synthetic_scenario())
    _assert_prediction_wins(baseline, predictive, std_ratio=0.75, attainment=0.95)


@pytest.mark.skipif(not TRACE.is_file(), reason="../shared/traces/mooncake_conversation.jsonl not present")
def test_prediction_beats_current_load_on_the_mooncake_trace_at_twice_its_rate():
    # measured (2026-11-29): rejected 963 vs 906, attainment 0.552 vs 0.933, batch std 27.1 vs 8.1
    scenario: Scenario = trace_scenario(str(TRACE))
    baseline, predictive = compare(scenario)
    _assert_prediction_wins(baseline, predictive, std_ratio=0.6, attainment=0.88)
