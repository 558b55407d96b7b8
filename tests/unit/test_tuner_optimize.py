"""The tuner's search: SLO parsing, the pre-filter, Optuna against a brute-force oracle, resume
from storage, reproducibility, failed and interrupted trials, and `tuner optimize` end to end."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json

import pytest
import yaml

from tuner import cli
from tuner.optimize import Objective, SearchSpace, Slo, parse_slo, run_study
from tuner.profile import DecodeProfile, EncodeProfile, Fit, PrefillProfile, Profile, constant, load_profile
from tuner.sim import Candidate
from tuner.synth import parse_spec, synthesize

pytestmark = pytest.mark.unit
SPEC = "requests=300,rate=12,text_median=150,text_max=800,output_median=20,output_max=80,sizes=224x224|448x336,prefix=0"


@pytest.fixture(scope="module")
def trace():
    return synthesize(parse_spec(SPEC))


@pytest.fixture(scope="module")
def profile():
    return dataclasses.replace(load_profile("cpu-tiny"), host_cores=0)   # every replica its own device


def queueing_profile() -> Profile:
    """Noise-free round numbers where every stage's replica count matters at 20 req/s."""
    def linear(**coef: float) -> Fit:
        return Fit(tuple(coef), tuple(coef.values()))
    return Profile(
        model="test", max_context=100_000, router_ms=constant(1.0),
        encode=EncodeProfile(tower_ms=linear(const=15.0, images=10.0, megapixels=0.0), call_ms=constant(3.0),
                             hit_call_ms=constant(1.0), tokens_per_image=16),
        prefill=PrefillProfile(compute_ms=linear(const=10.0, tokens=0.1, tokens_sq=0.0, cached_tokens=0.0),
                               call_ms=constant(2.0), block_tokens=32),
        decode=DecodeProfile(step_ms=linear(const=4.0, batch=1.0, context=0.001), join_ms=constant(6.0),
                             max_running=64, kv_capacity_tokens=1 << 20))


@pytest.mark.parametrize("text, expected", [
    ("ttft=2s", Slo("ttft", 90.0, 2.0)),
    ("tpot=50ms", Slo("tpot", 90.0, 0.05)),
    ("e2e:p99=20s", Slo("e2e", 99.0, 20.0)),
    ("TTFT:p50=0.5", Slo("ttft", 50.0, 0.5)),
])
def test_parse_slo(text, expected):
    assert parse_slo(text) == expected


@pytest.mark.parametrize("text, message", [
    ("latency=2s", "METRIC"), ("ttft", "METRIC"), ("ttft:p100=2s", "percentile"), ("ttft:90=2s", "percentile"),
    ("ttft=-1s", "positive"), ("ttft=fast", "positive"),
])
def test_parse_slo_rejects_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        parse_slo(text)


def small_space(**changes) -> SearchSpace:
    return dataclasses.replace(SearchSpace(max_replicas=3, encode_max_batch=(32,), encode_max_wait_ms=(5.0,),
                                           decode_max_running=(64,), local_prefill_tokens=(0,)), **changes)


def test_prefilter_skips_hopeless_candidates_without_simulating(trace, profile, monkeypatch):
    import tuner.optimize as optimize

    objective = Objective(trace, profile, [parse_slo("ttft=1s")], small_space())
    rho = objective.bounds.utilization(Candidate())
    assert all(0 < value for value in rho.values())
    calls = []
    monkeypatch.setattr(optimize, "simulate", lambda *a, **k: calls.append(a) or pytest.fail("simulated"))
    slow = dataclasses.replace(profile, decode=dataclasses.replace(
        profile.decode, step_ms=dataclasses.replace(profile.decode.step_ms, coef=(500.0, 0.0, 0.0))))
    hopeless = Objective(trace, slow, [parse_slo("ttft=1s")], small_space())
    scored = hopeless.score(Candidate())
    assert scored.prefiltered.startswith("decode: needs") and not scored.feasible and not calls
    unreachable = Objective(trace, profile, [parse_slo("ttft:p90=1ms")], small_space())
    assert "with no queueing at all" in unreachable.score(Candidate()).prefiltered


def test_search_finds_the_brute_force_cheapest_feasible_deployment():
    trace = synthesize(parse_spec(SPEC.replace("rate=12", "rate=20")))
    slos = [parse_slo("ttft=100ms"), parse_slo("tpot:p90=10ms")]
    objective = Objective(trace, queueing_profile(), slos, small_space())
    costs = []
    for e, p, d in itertools.product(range(1, 4), repeat=3):
        scored = objective.score(Candidate(e, p, d, encode_max_batch=32, encode_max_wait_ms=5.0,
                                           decode_max_running=64))
        if scored.feasible:
            costs.append(scored.cost)
    assert costs, "the oracle found nothing feasible: the test's SLOs are too tight"
    cheapest = min(costs)
    assert cheapest > 3, "the test's SLOs must need more than one replica per stage"
    outcome = run_study(objective, trials=40, progress=False, top=2)
    best = outcome.ranked[0]
    assert best.cost == cheapest and best.feasible
    assert all(value >= 0 for value in best.slack.values())
    assert 0 < best.headroom and set(best.spread) >= {"ttft_p90", "tpot_p90"}


def test_studies_resume_from_storage_and_seeds_reproduce(trace, profile, tmp_path):
    storage = f"sqlite:///{tmp_path / 'tuner.db'}"
    objective = Objective(trace, profile, [parse_slo("ttft=1s")], small_space())
    first = run_study(objective, trials=6, storage=storage, seed=3, progress=False, top=1)
    params = [t.params for t in first.study.trials]
    resumed = run_study(objective, trials=10, storage=storage, seed=3, progress=False, top=1)
    assert len(resumed.study.trials) == 10 and [t.params for t in resumed.study.trials[:6]] == params
    again = run_study(objective, trials=6, seed=3, progress=False, top=1)
    assert [t.params for t in again.study.trials] == params


def test_a_failing_trial_is_recorded_and_an_interrupt_keeps_what_was_found(trace, profile, monkeypatch):
    objective = Objective(trace, profile, [parse_slo("ttft=1s")], small_space())
    real = objective.score
    seen = []

    def flaky(candidate, **kwargs):
        seen.append(candidate)
        if len(seen) == 2:
            raise RuntimeError("simulator blew up")
        if len(seen) == 6:
            raise KeyboardInterrupt
        return real(candidate, **kwargs)

    monkeypatch.setattr(objective, "score", flaky)
    outcome = run_study(objective, trials=20, progress=False, top=1)
    states = [t.state.name for t in outcome.study.trials]
    assert states[1] == "FAIL" and "COMPLETE" in states[2:] and outcome.interrupted
    assert len(states) == 6 and outcome.ranked


def test_tuner_optimize_writes_every_artifact(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["optimize", "--slo", "ttft=2s", "--slo", "tpot:p90=40ms", "--synthetic", SPEC, "--trials", "12",
                     "--max-replicas", "3", "--no-progress", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "no --profile: using the bundled profile" in printed.err and "E/P/D" in printed.out
    for name in ("values.yaml", "candidates.json", "trials.csv", "report.md", "pareto.png", "latency_cdf.png"):
        assert (out / name).stat().st_size > 0, name
    values = yaml.safe_load((out / "values.yaml").read_text())
    best = json.loads((out / "candidates.json").read_text())["candidates"][0]
    assert values["decode"]["replicas"] == best["candidate"]["decode_replicas"]
    assert values["decode"]["args"] == ["--max-running", str(best["candidate"]["decode_max_running"])]
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {"ttft_p90", "constraint[ttft:p90<=2s]"} <= set(rows[0])
    assert "## Candidates" in (out / "report.md").read_text()


def test_tuner_optimize_refuses_an_unreachable_slo(tmp_path, capsys):
    code = cli.main(["optimize", "--slo", "ttft=1ms", "--synthetic", SPEC, "--out", str(tmp_path / "o"),
                     "--no-progress"])
    assert code == 1 and "unreachable" in capsys.readouterr().err


def test_fastkv_is_searched_only_when_allowed_and_exported_when_chosen(tmp_path, capsys):
    """With FastKV allowed, a profile on which it is 10x cheaper in prefill (and keeps a fifth of
    the KV) gets a cheaper deployment that uses it; values.yaml then sets prefill --fastkv. Without
    the flag FastKV is never tried; with a profile that never measured it, the flag is refused."""
    trace = synthesize(parse_spec(SPEC.replace("rate=12", "rate=20")))
    base = queueing_profile()
    profile = dataclasses.replace(base, prefill=dataclasses.replace(
        base.prefill, fastkv_compute_ms=Fit(("const", "tokens", "tokens_sq"), (10.0, 0.01, 0.0)),
        fastkv_kv_fraction=0.2))
    slos = [parse_slo("ttft=100ms"), parse_slo("tpot:p90=10ms")]
    lossless = run_study(Objective(trace, profile, slos, small_space()), trials=40, progress=False, top=2)
    allowed = run_study(Objective(trace, profile, slos, dataclasses.replace(small_space(), fastkv=(False, True))),
                        trials=40, progress=False, top=2)
    assert not any(t.params["fastkv"] for t in lossless.study.trials)
    best = allowed.ranked[0]
    assert best.candidate.fastkv and best.cost < lossless.ranked[0].cost
    assert best.candidate.prefill_replicas < lossless.ranked[0].candidate.prefill_replicas

    from tuner.report import helm_values
    assert "--fastkv" in yaml.safe_load(helm_values(best.candidate))["prefill"]["args"]
    assert "--fastkv" not in yaml.safe_load(helm_values(lossless.ranked[0].candidate))["prefill"]["args"]

    unmeasured = tmp_path / "no-fastkv.json"
    dataclasses.replace(base, prefill=dataclasses.replace(base.prefill, fastkv_compute_ms=None)).save(unmeasured)
    code = cli.main(["optimize", "--slo", "ttft=2s", "--synthetic", SPEC, "--allow-fastkv", "--no-progress",
                     "--profile", str(unmeasured), "--out", str(tmp_path / "o")])
    assert code == 1 and "no FastKV prefill measurements" in capsys.readouterr().err


def test_the_e_to_pd_threshold_is_searched_bounded_and_exported():
    """The router's --local-prefill-tokens is a (lossless) search knob: the closed-form bounds let
    short prompts skip the prefill stage (no prefill call, no KV hand-off), the optimizer tries
    every threshold of the space, and values.yaml sets the router flag only when it is on."""
    from tuner.report import helm_values, settings_text

    trace = synthesize(parse_spec(SPEC))
    objective = Objective(trace, queueing_profile(), [parse_slo("ttft=2s")], small_space(local_prefill_tokens=(0, 512)))
    everything_local = Candidate(local_prefill_tokens=1 << 20)
    assert objective.bounds.utilization(everything_local)["prefill"] == 0.0
    remote, local = objective.bounds.unloaded(Candidate()), objective.bounds.unloaded(everything_local)
    assert (local["ttft"] < remote["ttft"]).all() and (local["e2e"] < remote["e2e"]).all()
    outcome = run_study(objective, trials=12, progress=False, top=2)
    assert {t.params["local_prefill_tokens"] for t in outcome.study.trials} == {0, 512}
    values = yaml.safe_load(helm_values(Candidate(local_prefill_tokens=512, image_keep_ratio=0.5)))
    assert values["router"]["args"] == ["--image-keep-ratio", "0.5", "--local-prefill-tokens", "512"]
    assert "router" not in yaml.safe_load(helm_values(Candidate()))
    assert "E->PD <= 512" in settings_text(Candidate(local_prefill_tokens=512))
