"""The tuner's profile fits and discrete-event simulation: closed-form single requests, the decode
segments against a step-by-step reference, caches, processor sharing, accounting, determinism."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest

from tuner.profile import (
    DecodeProfile,
    EncodeProfile,
    Fit,
    PrefillProfile,
    Profile,
    bundled_profiles,
    constant,
    fit_linear,
    load_profile,
)
from tuner.sim import Candidate, _steps_within, simulate
from tuner.traces import TraceImage, TraceRequest

pytestmark = pytest.mark.unit


def linear(**coef: float) -> Fit:
    return Fit(tuple(coef), tuple(coef.values()))


def make_profile(**changes) -> Profile:
    """A noise-free profile with round numbers (ms)."""
    profile = Profile(
        model="test", max_context=100_000,
        router_ms=constant(1.0),
        encode=EncodeProfile(tower_ms=linear(const=10.0, images=2.0, megapixels=0.0), call_ms=constant(3.0),
                             hit_call_ms=constant(1.0), tokens_per_image=16),
        prefill=PrefillProfile(compute_ms=linear(const=5.0, tokens=0.01, tokens_sq=0.0, cached_tokens=0.0),
                               call_ms=constant(2.0), block_tokens=32),
        decode=DecodeProfile(step_ms=linear(const=4.0, batch=1.0, context=0.001), join_ms=constant(6.0),
                             max_running=64, kv_capacity_tokens=1 << 20))
    return dataclasses.replace(profile, **changes)


def request(t: float, text: int = 100, out: int = 10, images: tuple = (), blocks: tuple = ()) -> TraceRequest:
    return TraceRequest(arrival_s=t, context_tokens=text, generated_tokens=out, images=images, prefix_blocks=blocks)


def image(name: str) -> TraceImage:
    return TraceImage(name, 224, 224)


# --- fits ------------------------------------------------------------------------------------------

def test_median_fit_recovers_the_line_despite_outliers():
    rng = random.Random(0)
    rows = [{"x": float(x), "ms": 2.0 + 0.5 * x} for x in range(1, 60)]
    for row in rng.sample(rows, 6):            # 10% of samples 10x slower (a GC pause, a warm-up)
        row["ms"] *= 10
    fit = fit_linear(rows, "ms", ("const", "x"))
    assert fit.coef == pytest.approx((2.0, 0.5), rel=0.02)
    assert fit.residuals[len(fit.residuals) // 2] == pytest.approx(1.0, abs=0.01)
    assert max(fit.residuals) == pytest.approx(10.0, rel=0.05)    # the outliers stay in the noise model


def test_fit_coefficients_are_never_negative():
    rows = [{"x": float(x), "ms": 50.0 - 0.2 * x} for x in range(40)]
    fit = fit_linear(rows, "ms", ("const", "x"))
    assert fit.coef[1] == 0.0 and fit.coef[0] > 0
    assert all(fit.predict(x=x) >= 0 for x in (0, 1e6))


def test_profile_json_round_trip_and_bundled_profile():
    profile = make_profile(host_cores=2, measured_on="test box", idle_cores_per_process=0.07)
    assert Profile.from_json(profile.to_json()) == profile
    older = {key: value for key, value in profile.to_json().items() if key != "idle_cores_per_process"}
    assert Profile.from_json(older).idle_cores_per_process == 0.0   # profiles written before the field
    assert "cpu-tiny" in bundled_profiles()
    shipped = load_profile("cpu-tiny")
    assert shipped.measured_on and shipped.measured_at and shipped.encode.tokens_per_image > 0
    with pytest.raises(ValueError, match="version"):
        Profile.from_json({**profile.to_json(), "version": 99})
    with pytest.raises(ValueError, match="no such file or bundled profile"):
        load_profile("nope")


# --- the simulation ----------------------------------------------------------------------------

def test_a_request_alone_takes_exactly_the_sum_of_its_stages():
    profile = make_profile()
    result = simulate([request(0.0, text=84, out=5, images=(image("a"),))], profile,
                      Candidate(encode_max_wait_ms=5.0))
    prompt = 84 + 16
    # router 1 + batch wait 5 + tower (10 + 2) + encode call 3 + prefill (5 + 0.01 * 100) + prefill call 2
    ttft_ms = 1 + 5 + 12 + 3 + (5 + 0.01 * prompt) + 2
    assert result.outcomes[0].ttft_s == pytest.approx(ttft_ms / 1000)
    steps_ms = sum(4 + 1 + 0.001 * (prompt + k) for k in range(4))   # 4 steps at batch 1, context grows
    assert result.outcomes[0].e2e_s == pytest.approx((ttft_ms + 6 + steps_ms) / 1000)
    assert result.outcomes[0].tpot_s == pytest.approx((6 + steps_ms) / 4 / 1000)


def test_fastkv_candidate_uses_the_fastkv_fit_and_the_compressed_kv():
    """FastKV: prefill costs what its own fit says (the whole prompt: no prefix-cache reuse) and
    decode holds `fastkv_kv_fraction` of the prompt's rows (join and steps over that context)."""
    base = make_profile()
    prefill = dataclasses.replace(base.prefill, fastkv_compute_ms=linear(const=5.0, tokens=0.002, tokens_sq=0.0),
                                  fastkv_kv_fraction=0.25)
    profile = dataclasses.replace(base, prefill=prefill, decode=dataclasses.replace(
        base.decode, join_ms=linear(const=6.0, kv_tokens=0.01)))
    trace = [request(0.0, text=1000, out=5, blocks=(1, 2)), request(10.0, text=1000, out=5, blocks=(1, 2))]
    lossless, fastkv = (simulate(trace, profile, Candidate(fastkv=f)).outcomes for f in (False, True))
    assert fastkv[0].ttft_s == pytest.approx((1 + (5 + 0.002 * 1000) + 2) / 1000)
    assert fastkv[1].ttft_s == pytest.approx(fastkv[0].ttft_s)          # the repeated prefix is not reused
    assert lossless[1].ttft_s < lossless[0].ttft_s                         # ... while the lossless path reuses it
    kv_rows = 250
    steps_ms = sum(4 + 1 + 0.001 * (kv_rows + k) for k in range(4))
    assert fastkv[0].e2e_s - fastkv[0].ttft_s == pytest.approx((6 + 0.01 * kv_rows + steps_ms) / 1000)
    assert fastkv[0].tpot_s < lossless[0].tpot_s
    assert Profile.from_json(profile.to_json()) == profile                 # the FastKV fields round-trip
    with pytest.raises(ValueError, match="no FastKV prefill measurements"):
        simulate(trace, base, Candidate(fastkv=True))


def _reference_decode(arrivals: list[tuple[float, int, int]], step_ms) -> list[float]:
    """Step by step: (arrival s, tokens to decode, context) -> finish time; joins at step ends."""
    pending = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0])
    running: dict[int, list[int]] = {}
    finish = [math.nan] * len(arrivals)
    now = 0.0
    while pending or running:
        while pending and arrivals[pending[0]][0] <= now + 1e-12:
            i = pending.pop(0)
            running[i] = [arrivals[i][1], arrivals[i][2]]
        if not running:
            now = arrivals[pending[0]][0]
            continue
        now += step_ms(len(running), sum(c for _, c in running.values())) / 1000.0
        for i in list(running):
            running[i][0] -= 1
            running[i][1] += 1
            if running[i][0] == 0:
                finish[i] = now
                del running[i]
    return finish


def test_decode_segments_match_a_step_by_step_reference():
    profile = make_profile(router_ms=constant(0.0), decode=dataclasses.replace(make_profile().decode,
                                                                                join_ms=constant(0.0)),
                           prefill=dataclasses.replace(make_profile().prefill, compute_ms=constant(0.0),
                                                       call_ms=constant(0.0)))
    rng = random.Random(3)
    trace = [request(round(rng.uniform(0, 2), 4), text=rng.randint(10, 400), out=rng.randint(2, 80)) for _ in range(60)]
    result = simulate(trace, profile, Candidate())
    ordered = sorted(trace, key=lambda r: r.arrival_s)
    expected = _reference_decode([(r.arrival_s, r.generated_tokens - 1, r.context_tokens) for r in ordered],
                                 lambda batch, context: 4.0 + batch + 0.001 * context)
    got = [o.arrival_s + o.e2e_s for o in result.outcomes]
    assert got == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("elapsed", [0.0, 3.9, 4.0, 10.0, 123.4])
def test_steps_within_a_segment(elapsed):
    first, growth = 4.0, 0.25
    steps = _steps_within(elapsed, first, growth)
    total = lambda k: k * first + growth * k * (k - 1) / 2  # noqa: E731
    assert total(steps) <= elapsed < total(steps + 1)


def test_repeated_images_and_prefixes_hit_the_caches():
    profile = make_profile()
    same = [request(i * 1.0, images=(image("x"),), blocks=(7, 8)) for i in range(4)]
    distinct = [request(i * 1.0, images=(image(f"x{i}"),), blocks=(10 * i, 10 * i + 1)) for i in range(4)]
    profile = dataclasses.replace(profile, prefill=dataclasses.replace(
        profile.prefill, compute_ms=linear(const=5.0, tokens=0.05, tokens_sq=0.0, cached_tokens=0.0)))
    hit, miss = simulate(same, profile, Candidate()), simulate(distinct, profile, Candidate())
    assert hit.busy_s["encode"] == pytest.approx(miss.busy_s["encode"] / 4)   # one tower run instead of four
    assert hit.busy_s["prefill"] < miss.busy_s["prefill"]
    no_prefix = simulate(same, profile, Candidate(prefix_cache=False))
    assert no_prefix.busy_s["prefill"] == pytest.approx(miss.busy_s["prefill"])


def test_processor_sharing_slows_concurrent_work_on_a_shared_host():
    profile = make_profile(prefill=dataclasses.replace(make_profile().prefill, compute_ms=constant(100.0)))
    trace = [request(0.0), request(0.0)]
    own_gpus = simulate(trace, profile, Candidate(prefill_replicas=2))
    one_core = simulate(trace, dataclasses.replace(profile, host_cores=1), Candidate(prefill_replicas=2))
    two_cores = simulate(trace, dataclasses.replace(profile, host_cores=2), Candidate(prefill_replicas=2))
    assert one_core.percentile("ttft", 50) - own_gpus.percentile("ttft", 50) == pytest.approx(0.1, abs=0.02)
    assert two_cores.percentile("ttft", 50) == pytest.approx(own_gpus.percentile("ttft", 50), abs=0.01)


def test_idle_processes_take_cores_from_busy_work_on_a_shared_host():
    """Each service process's idle CPU (polling, heartbeats) comes off the cores busy replicas share:
    two 100 ms prefills on 2 cores run side by side, but not when the candidate's 5 processes keep
    one core busy while idle; a profile with its own accelerators ignores the figure."""
    profile = make_profile(prefill=dataclasses.replace(make_profile().prefill, compute_ms=constant(100.0)))
    trace = [request(0.0), request(0.0)]
    candidate = Candidate(prefill_replicas=2)
    assert candidate.processes() == 5
    quiet = dataclasses.replace(profile, host_cores=2)
    busy_idle = dataclasses.replace(profile, host_cores=2, idle_cores_per_process=0.2)
    one_core = dataclasses.replace(profile, host_cores=1)
    assert busy_idle.cores_for_work(candidate.processes()) == pytest.approx(1.0)
    assert simulate(trace, busy_idle, candidate).percentile("ttft", 50) == pytest.approx(
        simulate(trace, one_core, candidate).percentile("ttft", 50))
    assert simulate(trace, busy_idle, candidate).percentile("ttft", 50) > simulate(
        trace, quiet, candidate).percentile("ttft", 50) + 0.08
    own_gpus = dataclasses.replace(profile, idle_cores_per_process=0.2)
    assert own_gpus.cores_for_work(5) == 0.0
    assert simulate(trace, own_gpus, candidate).percentile("ttft", 50) == pytest.approx(
        simulate(trace, profile, candidate).percentile("ttft", 50))
    assert dataclasses.replace(profile, host_cores=2, idle_cores_per_process=1.0).cores_for_work(5) == 0.2


def test_every_request_is_completed_or_rejected_and_runs_are_reproducible():
    profile = load_profile("cpu-tiny")
    rng = random.Random(1)
    trace = [request(rng.uniform(0, 20), text=rng.randint(10, 1500), out=rng.randint(1, 700),
                     images=tuple(image(str(rng.randint(0, 30))) for _ in range(rng.randint(0, 3))),
                     blocks=tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 2)))) for _ in range(300)]
    first = simulate(trace, profile, Candidate(2, 1, 2), seed=5)
    assert len(first.outcomes) == 300
    for o in first.outcomes:
        assert bool(o.rejected) != (math.isfinite(o.ttft_s) and math.isfinite(o.e2e_s))
    assert first.rejected == sum(1 for r in trace if r.context_tokens + 16 * r.num_images + r.generated_tokens
                                 > profile.max_context)
    again = simulate(trace, profile, Candidate(2, 1, 2), seed=5)
    other = simulate(trace, profile, Candidate(2, 1, 2), seed=6)
    assert [o.e2e_s for o in again.outcomes] == [o.e2e_s for o in first.outcomes]
    assert [o.e2e_s for o in other.outcomes] != [o.e2e_s for o in first.outcomes]


def test_more_decode_replicas_never_hurt_and_load_raises_latency():
    profile = make_profile()
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(0.02, 400))
    trace = [request(float(t), text=200, out=60) for t in arrivals]
    one = simulate(trace, profile, Candidate(decode_replicas=1))
    four = simulate(trace, profile, Candidate(decode_replicas=4))
    assert four.mean("tpot") < one.mean("tpot")
    slow = [dataclasses.replace(r, arrival_s=r.arrival_s * 4) for r in trace]
    assert simulate(slow, profile, Candidate()).percentile("e2e", 90) < one.percentile("e2e", 90)


# --- E -> PD (local prefill on a decode replica) -----------------------------------------------

def test_a_short_prompt_takes_e_to_pd_with_no_prefill_call_and_no_hand_off():
    profile = make_profile()
    short, long = request(0.0, text=84, out=5), request(10.0, text=1000, out=5)
    result = simulate([short, long], profile, Candidate(local_prefill_tokens=512))
    local_ttft_ms = 1 + (5 + 0.01 * 84)                      # router + prefill compute on the decode replica
    assert result.outcomes[0].ttft_s == pytest.approx(local_ttft_ms / 1000)
    steps_ms = sum(4 + 1 + 0.001 * (84 + k) for k in range(4))
    assert result.outcomes[0].e2e_s == pytest.approx((local_ttft_ms + steps_ms) / 1000)   # no 6 ms join
    assert result.outcomes[1].ttft_s == pytest.approx((1 + (5 + 0.01 * 1000) + 2) / 1000)  # over the limit: E -> P -> D
    assert result.busy_s["prefill"] == pytest.approx((5 + 0.01 * 1000) / 1000)
    off = simulate([short, long], profile, Candidate())
    assert off.outcomes[0].ttft_s == pytest.approx((local_ttft_ms + 2) / 1000)


def test_a_local_prefill_pauses_the_running_sequences_and_is_skipped_when_slower():
    profile = make_profile(prefill=dataclasses.replace(make_profile().prefill, call_ms=constant(20.0)))
    running = request(0.0, text=1000, out=50)
    alone = simulate([running], profile, Candidate(local_prefill_tokens=512)).outcomes[0]
    both = simulate([running, request(0.1, text=84, out=2)], profile, Candidate(local_prefill_tokens=512))
    prefill_ms = 5 + 0.01 * 84
    assert both.busy_s["prefill"] == pytest.approx((5 + 0.01 * 1000) / 1000)        # the short one went E -> PD
    assert both.outcomes[0].e2e_s - alone.e2e_s >= prefill_ms / 1000                 # decoding waited for it
    # a cheap prefill call makes E -> P -> D sooner than waiting for the decode step in progress
    cheap = make_profile()
    routed = simulate([running, request(0.1, text=84, out=2)], cheap, Candidate(local_prefill_tokens=512))
    assert routed.busy_s["prefill"] == pytest.approx((5 + 0.01 * 1000 + prefill_ms) / 1000)


def test_e_to_pd_runs_are_reproducible_and_account_for_every_request():
    rng = random.Random(5)
    trace = [request(i * 0.01, text=rng.choice([50, 300, 3000]), out=rng.randint(1, 30)) for i in range(200)]
    candidate = Candidate(prefill_replicas=1, decode_replicas=2, local_prefill_tokens=512)
    first, second = (simulate(trace, make_profile(), candidate, seed=3) for _ in range(2))
    assert [o.ttft_s for o in first.outcomes] == [o.ttft_s for o in second.outcomes]
    assert all(not math.isnan(o.ttft_s) and not math.isnan(o.e2e_s) for o in first.outcomes)


def test_a_local_prefill_publishes_no_prefix_blocks():
    """Only a prefill replica publishes a prompt's prefix blocks: after a short prompt went E -> PD,
    a long one sharing its first block computes everything (with E -> PD off it reuses 512 tokens)."""
    short, long = request(0.0, text=84, out=3, blocks=(7,)), request(1.0, text=1000, out=3, blocks=(7, 8))
    local = simulate([short, long], make_profile(), Candidate(local_prefill_tokens=512))
    remote = simulate([short, long], make_profile(), Candidate())
    assert local.busy_s["prefill"] == pytest.approx((5 + 0.01 * 1000) / 1000)
    assert remote.busy_s["prefill"] == pytest.approx((5 + 0.01 * 84 + 5 + 0.01 * (1000 - 512)) / 1000)
