"""E+P colocation in the tuner: encode batches and prefills share each prefill replica's one model
thread (FIFO), a request's images are encoded where it is prefilled, the closed-form bounds and the
accounting load the prefill replicas with the encode work, and the search weighs colocation's saved
GPUs against that contention (conditional parameter, round-trip, resume, CLI)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest

from tuner import cli
from tuner.optimize import (
    Objective,
    SearchSpace,
    WorkloadBounds,
    candidate_from_params,
    candidate_params,
    first_trials,
    parse_slo,
    run_study,
    study_name,
)
from tuner.profile import DecodeProfile, EncodeProfile, Fit, PrefillProfile, Profile, constant
from tuner.sim import Candidate, _EncodeReplica, _PrefillReplica, simulate
from tuner.synth import parse_spec, synthesize
from tuner.traces import TraceImage, TraceRequest

pytestmark = pytest.mark.unit
SPEC = "requests=300,rate=20,text_median=150,text_max=800,output_median=20,output_max=80,sizes=224x224|448x336,prefix=0"
COLOCATED = Candidate(0, 1, 1, encode_colocated=True)


def linear(**coef: float) -> Fit:
    return Fit(tuple(coef), tuple(coef.values()))


def make_profile(tower_const: float = 10.0, tower_per_image: float = 2.0, prefill_per_token: float = 0.01) -> Profile:
    """Noise-free round numbers (ms), as in test_tuner_sim, with the encode tower and prefill costs as knobs."""
    return Profile(
        model="test", max_context=100_000, router_ms=constant(1.0),
        encode=EncodeProfile(tower_ms=linear(const=tower_const, images=tower_per_image, megapixels=0.0),
                             call_ms=constant(3.0), hit_call_ms=constant(1.0), tokens_per_image=16),
        prefill=PrefillProfile(compute_ms=linear(const=5.0, tokens=prefill_per_token, tokens_sq=0.0,
                                                 cached_tokens=0.0), call_ms=constant(2.0), block_tokens=32),
        decode=DecodeProfile(step_ms=linear(const=4.0, batch=1.0, context=0.001), join_ms=constant(6.0),
                             max_running=64, kv_capacity_tokens=1 << 20))


def request(t: float, text: int = 84, out: int = 5, images: tuple = ()) -> TraceRequest:
    return TraceRequest(arrival_s=t, context_tokens=text, generated_tokens=out, images=images)


def image(name: str, width: int = 224) -> TraceImage:
    return TraceImage(name, width, 224)


# --- the simulation ----------------------------------------------------------------------------

def test_a_request_alone_takes_the_same_time_colocated_or_not():
    trace = [request(0.0, images=(image("a"),))]
    # router 1 + batch wait 5 + tower (10 + 2) + encode call 3 + prefill (5 + 0.01 * 100) + prefill call 2
    ttft_ms = 1 + 5 + 12 + 3 + 6 + 2
    for candidate in (Candidate(), COLOCATED):
        assert simulate(trace, make_profile(), candidate).outcomes[0].ttft_s == pytest.approx(ttft_ms / 1000)


def test_an_encode_batch_waits_for_the_prefill_running_on_its_thread():
    """A long prompt prefills 1..106 ms; an image request's batch forms at 8 ms. Colocated it runs
    after the prefill (106..118), on separate encode replicas at once (8..20)."""
    trace = [request(0.0, text=10_000), request(0.002, images=(image("a"),))]
    colocated = simulate(trace, make_profile(), COLOCATED).outcomes[1]
    separate = simulate(trace, make_profile(), Candidate()).outcomes[1]
    # colocated: tower 106..118, call 3, its prefill 121..127, call 2
    assert colocated.ttft_s == pytest.approx((129 - 2) / 1000)
    # separate: tower 8..20, call 3, its prefill queued behind the long one 106..112, call 2
    assert separate.ttft_s == pytest.approx((114 - 2) / 1000)


def test_a_prefill_waits_for_the_encode_batch_running_on_its_thread():
    """An image request's batch runs 6..18 ms; a text prompt routed at 11 ms prefills after it."""
    trace = [request(0.0, images=(image("a"),)), request(0.010, text=1000)]
    colocated = simulate(trace, make_profile(), COLOCATED).outcomes[1]
    separate = simulate(trace, make_profile(), Candidate()).outcomes[1]
    assert colocated.ttft_s == pytest.approx((18 + 15 + 2 - 10) / 1000)
    assert separate.ttft_s == pytest.approx((1 + 15 + 2) / 1000)


def _bursty_trace() -> list[TraceRequest]:
    """Bursts of three image requests (every image a distinct width, every prompt a distinct length)
    and a text-only prompt between bursts."""
    trace, width = [], itertools.count(100)
    for i in range(60):
        t = (i // 3) * 0.04
        images = tuple(image(f"{i}-{k}", next(width)) for k in range(1 + i % 2))
        trace.append(request(t, text=100 + 20 * i, out=3 + i % 7, images=images))
    trace += [request(0.02 + 0.04 * j, text=3000 + 20 * j, out=4) for j in range(20)]
    return trace


def test_each_request_is_encoded_on_the_replica_that_prefills_it(monkeypatch):
    """Every image job a batcher receives and every prefill a model thread receives is logged; with
    distinct image sizes and prompt lengths (noise-free) each maps back to its request."""
    profile, trace = make_profile(tower_const=20.0, tower_per_image=10.0), _bursty_trace()
    encoded_on, prefilled_on = {}, {}
    submit_image, submit_job = _EncodeReplica.submit, _PrefillReplica.submit

    def log_image(self, job):
        encoded_on.setdefault(job[1], []).append(self.host)
        submit_image(self, job)

    def log_job(self, ms, done, kind="prefill"):
        if kind == "prefill":
            prefilled_on.setdefault(round(ms, 9), []).append(self)
        submit_job(self, ms, done, kind)

    monkeypatch.setattr(_EncodeReplica, "submit", log_image)
    monkeypatch.setattr(_PrefillReplica, "submit", log_job)
    result = simulate(trace, profile, Candidate(0, 3, 2, encode_colocated=True))

    assert result.rejected == 0 and all(math.isfinite(o.ttft_s) and math.isfinite(o.e2e_s) for o in result.outcomes)
    homes = set()
    for r in trace:
        prompt = r.context_tokens + 16 * r.num_images
        [replica] = prefilled_on[round(profile.prefill.compute_ms_for(prompt, 0, False), 9)]
        for im in r.images:
            assert encoded_on[im.width * im.height / 1e6] == [replica]   # each image once, on its prefill replica
        homes.add(replica)
    assert len(homes) == 3                                              # the placement used every replica
    assert result.replicas == {"encode": 0, "prefill": 3, "decode": 2} and result.hosted_on == {"encode": "prefill"}


def test_colocated_accounting_loads_the_prefill_replicas():
    profile, trace = make_profile(tower_const=20.0, tower_per_image=10.0), _bursty_trace()
    colocated = simulate(trace, profile, Candidate(0, 2, 2, encode_colocated=True))
    separate = simulate(trace, profile, Candidate(1, 2, 2))
    assert colocated.busy_s["prefill"] == pytest.approx(separate.busy_s["prefill"])   # the same prompts
    used = colocated.utilization()
    span = 2 * colocated.makespan_s
    assert used["encode"] == pytest.approx(colocated.busy_s["encode"] / span)
    assert used["prefill"] == pytest.approx((colocated.busy_s["encode"] + colocated.busy_s["prefill"]) / span)
    assert colocated.bottleneck() != "encode"


def test_heavy_encode_makes_colocation_slower_than_an_encode_replica():
    """With the tower far costlier than prefill, E+P1D1 queues prompts and batches on one thread: its
    TTFT is clearly worse than E1P1D1's (equal if colocation were simulated as free)."""
    trace = synthesize(parse_spec(SPEC))
    profile = make_profile(tower_const=30.0, tower_per_image=25.0)
    colocated, separate = (simulate(trace, profile, c) for c in (COLOCATED, Candidate(1, 1, 1)))
    assert colocated.percentile("ttft", 90) > 1.3 * separate.percentile("ttft", 90)
    assert colocated.mean("ttft") > 1.3 * separate.mean("ttft")


def test_light_encode_under_a_gpu_budget_only_colocation_fits():
    """With a cheap tower, E+P1D1 (2 GPUs) meets the SLO almost as E1P1D1 (3 GPUs) does; under a
    2-GPU budget only the colocated deployment is possible, and the search finds it."""
    trace = synthesize(parse_spec(SPEC.replace("rate=20", "rate=8")))
    profile = make_profile(tower_const=2.0, tower_per_image=1.0)
    slos = [parse_slo("ttft=60ms")]
    space = SearchSpace(max_replicas=2, gpus=2, encode_max_batch=(32,), encode_max_wait_ms=(5.0,),
                        decode_max_running=(64,), local_prefill_tokens=(0,), encode_colocated=(False, True))
    objective = Objective(trace, profile, slos, space)
    colocated, separate = objective.score(COLOCATED), objective.score(Candidate(1, 1, 1))
    assert colocated.feasible and separate.feasible and (colocated.cost, separate.cost) == (2.0, 3.0)
    assert colocated.metrics["ttft_p90"] < 1.2 * separate.metrics["ttft_p90"]
    found = run_study(objective, trials=8, seed=1, progress=False, top=1)
    assert found.ranked and found.ranked[0].candidate == COLOCATED
    separate_only = run_study(Objective(trace, profile, slos, dataclasses.replace(space, encode_colocated=(False,))),
                              trials=8, seed=1, progress=False, top=1)
    assert not separate_only.ranked


def test_colocated_runs_are_reproducible():
    trace, profile = _bursty_trace(), make_profile(tower_const=20.0, tower_per_image=10.0)
    noisy = dataclasses.replace(profile, prefill=dataclasses.replace(profile.prefill, compute_ms=dataclasses.replace(
        profile.prefill.compute_ms, residuals=(0.8, 1.0, 1.5))), encode=dataclasses.replace(
        profile.encode, tower_ms=dataclasses.replace(profile.encode.tower_ms, residuals=(0.7, 1.0, 2.0))))
    candidate = Candidate(0, 2, 2, encode_colocated=True, local_prefill_tokens=512)
    first, again, other = (simulate(trace, noisy, candidate, seed=s) for s in (4, 4, 5))
    outcomes = lambda r: [(o.ttft_s, o.e2e_s, o.tpot_s) for o in r.outcomes]  # noqa: E731
    assert outcomes(again) == outcomes(first) and again.busy_s == first.busy_s
    assert outcomes(other) != outcomes(first)


def test_the_prompt_prefills_where_its_images_were_encoded_or_takes_e_to_pd():
    """A's batch runs on replica 0 (6..18 ms); long prompt B (routed at 11) goes to idle replica 1,
    long prompt C (routed at 12) to replica 0 behind the batch (18..123). A's prompt, ready at 21,
    stays on replica 0 behind C (123..128.36) although replica 1 frees at 116; with E -> PD allowed
    the idle decode replica prefills it at once, as that is predicted sooner than replica 0."""
    trace = [request(0.0, text=20, out=3, images=(image("a"),)), request(0.010, text=10_000, out=2),
             request(0.011, text=10_000, out=2)]
    prompt_ms = 5 + 0.01 * 36
    pinned = simulate(trace, make_profile(), Candidate(0, 2, 1, encode_colocated=True))
    assert pinned.outcomes[0].ttft_s == pytest.approx((123 + prompt_ms + 2) / 1000)
    local = simulate(trace, make_profile(), Candidate(0, 2, 1, encode_colocated=True, local_prefill_tokens=512))
    assert local.outcomes[0].ttft_s == pytest.approx((21 + prompt_ms) / 1000)
    assert local.busy_s["prefill"] == pytest.approx(2 * (5 + 0.01 * 10_000) / 1000)   # only B and C
    assert local.busy_s["encode"] == pytest.approx(12 / 1000)


# --- the bounds and the search -----------------------------------------------------------------

def test_bounds_count_encode_work_against_the_prefill_replicas():
    trace = synthesize(parse_spec(SPEC))
    bounds = WorkloadBounds(trace, make_profile(tower_const=30.0, tower_per_image=60.0, prefill_per_token=0.2))
    separate = bounds.utilization(Candidate(1, 2, 1))
    colocated = bounds.utilization(Candidate(0, 2, 1, encode_colocated=True))
    assert colocated["encode"] == pytest.approx(separate["encode"] / 2)
    assert colocated["prefill"] == pytest.approx(separate["encode"] / 2 + separate["prefill"])
    assert colocated["decode"] == separate["decode"]
    objective = Objective(trace, bounds.profile, [parse_slo("ttft=10s")], SearchSpace())
    reason = objective.bounds.hopeless(Candidate(0, 1, 1, encode_colocated=True), objective.slos)
    assert reason.startswith("prefill: needs") and not objective.bounds.hopeless(Candidate(1, 1, 1), objective.slos)
    alone = bounds.unloaded(COLOCATED)
    assert all((alone[m] == bounds.unloaded(Candidate())[m]).all() for m in alone)


def test_candidate_params_round_trip_and_old_trials_read_as_separate():
    for candidate in (Candidate(2, 3, 4, local_prefill_tokens=512), Candidate(0, 3, 4, encode_colocated=True)):
        params = candidate_params(candidate)
        assert "encode_colocated" in params and candidate_from_params(params) == candidate
        assert candidate_from_params(json.loads(json.dumps(params))) == candidate      # candidates.json
    colocated_trial = {k: v for k, v in candidate_params(COLOCATED).items() if k != "encode_replicas"}
    assert candidate_from_params(colocated_trial) == COLOCATED
    old_trial = {k: v for k, v in candidate_params(Candidate(2, 1, 1)).items() if k != "encode_colocated"}
    assert candidate_from_params(old_trial) == Candidate(2, 1, 1)


def test_search_finds_the_brute_force_cheapest_over_both_placements():
    """The oracle of test_tuner_optimize over both placements: on this profile colocation is the
    cheapest feasible deployment, and the conditional search finds exactly its cost."""
    trace = synthesize(parse_spec(SPEC))
    profile = make_profile(tower_const=15.0, tower_per_image=10.0, prefill_per_token=0.1)
    slos = [parse_slo("ttft=100ms"), parse_slo("tpot:p90=10ms")]
    space = SearchSpace(max_replicas=3, encode_max_batch=(32,), encode_max_wait_ms=(5.0,), decode_max_running=(64,),
                        local_prefill_tokens=(0,), encode_colocated=(False, True))
    objective = Objective(trace, profile, slos, space)
    oracle = [Candidate(e, p, d) for e, p, d in itertools.product(range(1, 4), repeat=3)]
    oracle += [Candidate(0, p, d, encode_colocated=True) for p, d in itertools.product(range(1, 4), repeat=2)]
    feasible = [s for s in map(objective.score, oracle) if s.feasible]
    cheapest = min(s.cost for s in feasible)
    best_separate = min(s.cost for s in feasible if not s.candidate.encode_colocated)
    assert cheapest < best_separate, "the test needs colocation to be the cheapest way to meet the SLOs"
    outcome = run_study(objective, trials=40, seed=0, progress=False, top=2)
    best = outcome.ranked[0]
    assert best.cost == cheapest and best.candidate.encode_colocated and best.feasible
    trials = outcome.study.trials
    assert [candidate_from_params(t.params) for t in trials[:2]] == first_trials(objective.bounds, space)
    assert {t.params["encode_colocated"] for t in trials} == {False, True}
    assert all(("encode_replicas" in t.params) != t.params["encode_colocated"] for t in trials)
    again = run_study(objective, trials=40, seed=0, progress=False, top=2)
    assert [t.params for t in again.study.trials] == [t.params for t in trials]


def test_a_study_from_before_the_knob_resumes(tmp_path):
    """A stored study whose trials never had encode_colocated keeps its name under a separate-only
    space and resumes: its trials read as separate encode, new ones carry the parameter."""
    import optuna

    trace = synthesize(parse_spec(SPEC))
    profile, slos = make_profile(), [parse_slo("ttft=1s")]
    space = SearchSpace(max_replicas=2, encode_max_batch=(32,), encode_max_wait_ms=(5.0,), decode_max_running=(64,),
                        local_prefill_tokens=(0,))
    assert space.encode_colocated == (False,)
    searched = dataclasses.replace(space, encode_colocated=(False, True))
    assert study_name(trace, profile, slos, searched, False) != study_name(trace, profile, slos, space, False)
    storage = f"sqlite:///{tmp_path / 'old.db'}"
    old = optuna.create_study(study_name=study_name(trace, profile, slos, space, False), storage=storage)
    params = {k: v for k, v in candidate_params(Candidate(1, 1, 1)).items() if k != "encode_colocated"}
    distributions = {k: optuna.distributions.IntDistribution(1, space.max_replicas) if k.endswith("_replicas")
                     else optuna.distributions.CategoricalDistribution([v]) for k, v in params.items()}
    old.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=3.0,
                                            user_attrs={"metrics": {"ttft_p90": 0.5}, "cost": 3.0},
                                            constraints={slos[0].label(): -0.5}))
    outcome = run_study(Objective(trace, profile, slos, space), trials=4, storage=storage, progress=False, top=4)
    trials = outcome.study.trials
    assert len(trials) == 4 and "encode_colocated" not in trials[0].params
    assert all(t.params["encode_colocated"] is False for t in trials[1:])
    assert Candidate(1, 1, 1) in {s.candidate for s in outcome.ranked}   # the old trial, read as separate


def test_tuner_optimize_encode_placement_flag(tmp_path, monkeypatch):
    """--encode-placement sets the space's placements (default: search both); colocated only writes
    a colocated candidate."""
    import tuner.optimize

    spaces = []
    real = tuner.optimize.Objective

    def capture(*args, **kwargs):
        objective = real(*args, **kwargs)
        spaces.append(objective.space)
        return objective

    monkeypatch.setattr(tuner.optimize, "Objective", capture)
    base = ["optimize", "--slo", "ttft=2s", "--synthetic", SPEC.replace("requests=300", "requests=60"), "--trials",
            "3", "--max-replicas", "2", "--no-progress", "--top", "1"]
    for flag, expected in ((), (False, True)), (("--encode-placement", "separate"), (False,)):
        assert cli.main([*base, *flag, "--out", str(tmp_path / "o")]) == 0
        assert spaces[-1].encode_colocated == expected
    assert cli.main([*base, "--encode-placement", "colocated", "--out", str(tmp_path / "c")]) == 0
    best = json.loads((tmp_path / "c" / "candidates.json").read_text())["candidates"][0]
    assert best["candidate"]["encode_colocated"] and best["candidate"]["encode_replicas"] == 0
    assert best["label"].startswith("E+P")
