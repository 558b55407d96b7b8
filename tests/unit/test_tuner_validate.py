"""Predicted-vs-measured comparison: signed errors, bounds, the verdict, and the per-class split
of a mixed trace (text-only vs with images), whose overall median sits between two humps."""

from __future__ import annotations

import math

import pytest

from tuner.live import Measured
from tuner.sim import RequestOutcome, SimResult
from tuner.traces import TraceImage, TraceRequest
from tuner.validate import compare, compare_by_class, verdict

pytestmark = pytest.mark.unit


def _request(i: int, images: int) -> TraceRequest:
    return TraceRequest(arrival_s=float(i), context_tokens=100, generated_tokens=4,
                        images=tuple(TraceImage(f"h{i}-{k}", 64, 64) for k in range(images)))


def _result(ttfts: list[float]) -> SimResult:
    return SimResult([RequestOutcome(float(i), ttft_s=t, e2e_s=t + 0.1, tpot_s=0.01) for i, t in enumerate(ttfts)],
                     {"encode": 0.0, "prefill": 0.0, "decode": 0.0}, {"encode": 1, "prefill": 1, "decode": 1}, 10.0)


def test_a_bimodal_median_misses_while_each_class_is_close():
    # text requests take ~10 ms, image requests ~30 ms; the prediction is 4% high in each class,
    # but one request more on the slow side moves the overall median from one hump to the other
    requests = [_request(i, 0 if i % 2 else 2) for i in range(10)]
    measured_ms = [30, 10, 30, 10, 30, 10, 30, 10, 30, 10]
    predicted_ms = [31.2, 10.4, 31.2, 10.4, 31.2, 10.4, 31.2, 10.4, 31.2, 31.2]   # the last text one queued
    measured = [Measured(ttft_s=t / 1000, e2e_s=t / 1000 + 0.1, tpot_s=0.01) for t in measured_ms]
    overall = {(r.metric, r.statistic): r for r in compare(_result([t / 1000 for t in predicted_ms]), measured)}
    assert overall[("ttft", "p50")].error == pytest.approx(31.2 / 20 - 1)     # +56%: between the humps
    by_class = compare_by_class(requests, _result([t / 1000 for t in predicted_ms]), measured)
    assert set(by_class) == {"text-only", "with images"}
    images = {(r.metric, r.statistic): r for r in by_class["with images"]}
    assert images[("ttft", "p50")].error == pytest.approx(0.04)
    text = {(r.metric, r.statistic): r for r in by_class["text-only"]}
    assert text[("ttft", "p50")].error == pytest.approx(0.04) and not text[("ttft", "p90")].within


def test_failed_requests_and_misses_make_the_candidate_unverified():
    measured = [Measured(ttft_s=0.01, e2e_s=0.1, tpot_s=0.01), Measured(error="UnavailableError: gone")]
    rows = compare(_result([0.01, 0.01]), measured)
    assert all(r.within for r in rows if math.isfinite(r.error))
    assert verdict(rows, failed_requests=1).startswith("UNVERIFIED: ") and "1 requests failed" in verdict(rows, 1)
