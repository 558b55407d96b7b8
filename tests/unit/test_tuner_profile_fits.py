"""What `tuner profile` fits from its samples, and how a live replay judges each fit: image
requests' router and prefill-call costs grow with their images, a concurrent decode run is one
step row however many streams it had, and `component_fits` names the component that was off."""

from __future__ import annotations

import types

import pytest

from tuner.live import Measured
from tuner.profiler import Deployment, Sample, _step_rows_per_run, build_profile
from tuner.traces import TraceImage, TraceRequest
from tuner.validate import component_fits

pytestmark = pytest.mark.unit

INFO = types.SimpleNamespace(model="tiny", revision="r1", max_context=2048, image_tokens_per_image=16)


def _router_ms(images: int, megapixels: float) -> float:
    return 2.0 + 0.5 * images + 3.0 * megapixels


def _call_ms(images: int) -> float:
    return 3.0 + 0.25 * images


def _sample(text_tokens: int, images: int = 0, side: int = 64, *, compute_scale: float = 1.0,
            steps: int = 0, batch: float = 1.0, concurrency: int = 1, run: int = 0) -> Sample:
    """A request whose every stage took what the formulas above (and below) say."""
    megapixels = images * side * side / 1e6
    tokens = text_tokens + images * INFO.image_tokens_per_image
    compute = (1.0 + 0.01 * tokens) * compute_scale
    prefill_rpc = compute + _call_ms(images)
    timings = {"prefill.prefill_ms": compute, "prefill.computed_tokens": float(tokens), "prefill_rpc_ms": prefill_rpc}
    encode_rpc = 0.0
    if images:
        tower = 4.0 + 2.0 * images
        encode_rpc = tower + 1.0 + 0.1 * images
        timings |= {"encode.images_encoded": float(images), "encode.tower_ms": tower, "encode_rpc_ms": encode_rpc}
    ttft_ms = _router_ms(images, megapixels) + encode_rpc + prefill_rpc
    e2e_ms = ttft_ms
    if steps:
        step = 0.8 + 0.1 * batch
        timings |= {"decode.decode_steps": float(steps), "decode.decode_batch_mean": batch,
                    "decode.decode_ms": step * (steps - 1)}
        e2e_ms += 4.0 + step * steps   # the join, then the steps
    measured = Measured(ttft_s=ttft_ms / 1000, e2e_s=e2e_ms / 1000, prompt_tokens=tokens,
                        completion_tokens=max(steps, 1), timings=timings)
    return Sample(images, megapixels, concurrency, measured, run)


def _profile(**scale):
    prefill = [_sample(t, **scale) for t in (32, 128, 384, 768) for _ in range(2)]
    encode = [_sample(16, n, side, **scale) for n in (1, 2, 4, 8) for side in (64, 512)]
    decode = [_sample(tokens, steps=48, run=tokens + i) for tokens in (64, 512) for i in range(3)]
    decode += [_sample(tokens, steps=48, batch=b, concurrency=int(b), run=tokens + 10 + int(b))
               for tokens in (64, 512) for b in (2.0, 4.0, 8.0) for _ in range(int(b))]
    return build_profile(INFO, prefill, encode, decode, Deployment())


def test_image_requests_pay_the_router_and_prefill_call_per_image():
    profile = _profile()
    for images, side in ((0, 0), (1, 512), (4, 64), (8, 512)):
        megapixels = images * side * side / 1e6
        assert profile.router_ms.predict(prompt_tokens=100, images=images, megapixels=megapixels) == \
            pytest.approx(_router_ms(images, megapixels), rel=0.02)
        assert profile.prefill.call_ms.predict(tokens=100, images=images) == pytest.approx(_call_ms(images), rel=0.02)


def test_a_concurrent_decode_run_is_one_step_row():
    runs = [_sample(64, steps=48, run=1), _sample(64, steps=48, run=2)]
    runs += [_sample(64, steps=48, batch=16.0, concurrency=16, run=3) for _ in range(16)]
    rows = _step_rows_per_run(runs)
    assert len(rows) == 3 and sorted(r["batch"] for r in rows) == [1.0, 1.0, 16.0]
    assert _step_rows_per_run([_sample(64, steps=48), _sample(64, steps=48)]) != []   # no run id: each its own
    assert len(_step_rows_per_run([_sample(64, steps=48), _sample(64, steps=48)])) == 2


def test_component_fits_name_the_component_the_live_run_differed_on():
    profile = _profile()
    requests = [TraceRequest(float(i), 100 + 10 * i, 24, images=tuple(TraceImage(f"h{i}-{k}", 224, 224)
                                                                      for k in range(i % 3))) for i in range(12)]
    live = [_sample(r.context_tokens, r.num_images, 224, compute_scale=1.3, steps=24).measured for r in requests]
    ratios = {c.name: c.median_ratio for c in component_fits(profile, requests, live)}
    assert ratios["prefill compute"] == pytest.approx(1.3, rel=0.03)
    for name in ("router", "prefill call", "encode tower", "decode step", "decode join"):
        assert ratios[name] == pytest.approx(1.0, rel=0.05), name
    assert component_fits(profile, requests, [Measured(error="UnavailableError: gone")] * 12) == []
