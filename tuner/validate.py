"""`tuner validate`: replay a trace against a live deployment and compare what the simulator
predicted for it with what a client measured.

A candidate counts as verified only when every compared statistic is within its error bound
(default: 15% for p50 / p90 / mean, 25% for p99); otherwise it is labelled UNVERIFIED with the
statistics that missed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from tuner.live import Measured
from tuner.profile import Profile
from tuner.profiler import Sample, component_rows
from tuner.sim import SimResult
from tuner.traces import TraceRequest

COMPARED = (("ttft", "p50"), ("ttft", "p90"), ("ttft", "p99"), ("tpot", "mean"), ("tpot", "p50"), ("tpot", "p90"),
            ("e2e", "p50"), ("e2e", "p90"))


@dataclasses.dataclass(frozen=True)
class Bounds:
    central: float = 0.15   # p50, p90 and means
    tail: float = 0.25      # p99

    def of(self, statistic: str) -> float:
        return self.tail if statistic == "p99" else self.central


@dataclasses.dataclass(frozen=True)
class Comparison:
    metric: str
    statistic: str
    predicted_s: float
    measured_s: float
    bound: float

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        if not math.isfinite(self.measured_s) or self.measured_s <= 0:
            return math.inf
        return (self.predicted_s - self.measured_s) / self.measured_s

    @property
    def within(self) -> bool:
        return abs(self.error) <= self.bound


def statistic(values: Sequence[float], name: str) -> float:
    data = np.array([v for v in values if math.isfinite(v)], dtype=float)
    if not len(data):
        return math.nan
    return float(data.mean()) if name == "mean" else float(np.percentile(data, float(name[1:])))


def compare(predicted: SimResult, measured: Sequence[Measured], bounds: Bounds = Bounds(),
            compared: Sequence[tuple[str, str]] = COMPARED) -> list[Comparison]:
    ok = [m for m in measured if not m.error]
    rows = []
    for metric, name in compared:
        simulated = statistic(predicted.values(metric).tolist(), name)
        live = statistic([getattr(m, f"{metric}_s") for m in ok], name)
        rows.append(Comparison(metric, name, simulated, live, bounds.of(name)))
    return rows


def compare_by_class(requests: Sequence[TraceRequest], predicted: SimResult, measured: Sequence[Measured],
                     bounds: Bounds = Bounds(), compared: Sequence[tuple[str, str]] = (("ttft", "p50"), ("ttft", "p90"))
                     ) -> dict[str, list[Comparison]]:
    """`compare` within each request class ("text-only", "with images"): a trace that mixes them
    has a two-humped TTFT distribution whose overall median falls between the humps, where a small
    shift of either moves it a lot; per class the percentiles say what the simulator got right.
    `predicted.outcomes` and `measured` are in arrival order (as `simulate` and `replay` give them)."""
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    classes = {"text-only": [r.num_images == 0 for r in ordered], "with images": [r.num_images > 0 for r in ordered]}
    out = {}
    for name, member in classes.items():
        if not any(member):
            continue
        subset = dataclasses.replace(predicted, outcomes=[o for o, m in zip(predicted.outcomes, member) if m])
        out[name] = compare(subset, [x for x, m in zip(measured, member) if m], bounds, compared)
    return out


def verdict(rows: Sequence[Comparison], failed_requests: int) -> str:
    missed = [f"{r.metric} {r.statistic} ({r.error:+.0%})" for r in rows if not r.within]
    if failed_requests:
        missed.append(f"{failed_requests} requests failed")
    return "VERIFIED" if not missed else "UNVERIFIED: " + ", ".join(missed)


def comparison_json(rows: Sequence[Comparison]) -> list[dict]:
    return [{"metric": r.metric, "statistic": r.statistic, "predicted_ms": r.predicted_s * 1000,
             "measured_ms": r.measured_s * 1000, "error": r.error if math.isfinite(r.error) else None,
             "bound": r.bound, "within": r.within} for r in rows]


@dataclasses.dataclass(frozen=True)
class ComponentFit:
    """How one fitted service-time component of a profile did on a live replay: the median of
    observed / predicted over the requests that exercised it (1.0: the profile was right; below 1:
    the live deployment was faster than profiled)."""
    name: str
    median_ratio: float
    requests: int


def component_fits(profile: Profile, requests: Sequence[TraceRequest], measured: Sequence[Measured]
                   ) -> list[ComponentFit]:
    """Each profile fit judged on the live requests' own stage timings (`Complete.timings_ms`), with
    the rows the profiler fits it on: which stage's model a percentile miss comes from. Under load a
    component also holds what the profile's alone-samples lacked (CPU contention on a shared host,
    queueing in RPCs and at decode's join), so ratios above 1 are expected there; the simulator adds
    those separately. `measured` in arrival order, as `replay` gives it."""
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    samples = [sample_of(r, m) for r, m in zip(ordered, measured) if not m.error and m.timings]
    out = []
    for name, fit, target, rows in component_rows(profile, samples):
        ratios = [row[target] / predicted for row in rows
                  if (predicted := fit.predict(**{k: v for k, v in row.items() if k != target})) > 0]
        if ratios:
            out.append(ComponentFit(name, float(np.median(ratios)), len(ratios)))
    return out


def sample_of(request: TraceRequest, measured: Measured) -> Sample:
    """A replayed request as the profiler's fits see it."""
    return Sample(request.num_images, request.megapixels, 0, measured)
