"""Per-stage service-time models of a deployment: what the simulator needs to predict it.

A `Profile` holds, for each stage, linear fits of the form ms = sum(coef_i * feature_i) with
non-negative coefficients (DistServe's a + b*tokens + c*tokens^2 for prefill; a + b*batch +
c*context for a decode step), each with the residual ratios observed / predicted it was fitted
with, so the simulator can draw realistic service-time noise (tails included) instead of
assuming a distribution. Profiles are JSON, versioned, and say where and when they were measured.

Invariant: every fit's prediction is >= 0 for non-negative features (coefficients are
constrained >= 0), and its residual ratios are positive with median near 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

PROFILE_VERSION = 1
RESIDUAL_QUANTILES = 41  # residual ratios kept per fit (evenly spaced quantiles)


@dataclasses.dataclass(frozen=True)
class Fit:
    """ms = sum(coef[i] * x[terms[i]]), "const" being 1."""
    terms: tuple[str, ...]
    coef: tuple[float, ...]
    residuals: tuple[float, ...] = (1.0,)     # observed / predicted, as quantiles
    samples: int = 0
    mape: float = 0.0                          # mean absolute percentage error of the fit on its samples
    ranges: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # feature ranges fitted on

    def predict(self, **x: float) -> float:
        return sum(c * (1.0 if t == "const" else x[t]) for t, c in zip(self.terms, self.coef))

    def extrapolates(self, **x: float) -> bool:
        """True when a feature lies beyond 1.5x the range this fit was measured on."""
        return any(x[t] > 1.5 * hi for t, (_, hi) in self.ranges.items() if t in x)

    def to_json(self) -> dict:
        return {"terms": list(self.terms), "coef": list(self.coef), "residuals": list(self.residuals),
                "samples": self.samples, "mape": self.mape, "ranges": {k: list(v) for k, v in self.ranges.items()}}

    @classmethod
    def from_json(cls, data: Mapping) -> Fit:
        return cls(tuple(data["terms"]), tuple(float(c) for c in data["coef"]),
                   tuple(float(r) for r in data.get("residuals", (1.0,))), int(data.get("samples", 0)),
                   float(data.get("mape", 0.0)), {k: tuple(v) for k, v in data.get("ranges", {}).items()})


def fit_linear(rows: Sequence[Mapping[str, float]], target: str, terms: Sequence[str]) -> Fit:
    """The median fit (least absolute deviations, by iteratively reweighted least squares) with
    non-negative coefficients: a few slow outliers (a warm-up, a GC pause) do not move it; they stay
    in the residuals, where the simulator draws them back at their observed frequency. Needs at
    least one row."""
    if not rows:
        raise ValueError(f"no samples to fit {target}")
    y = np.array([row[target] for row in rows], dtype=float)
    x = np.array([[1.0 if t == "const" else row[t] for t in terms] for row in rows], dtype=float)
    weights = np.ones(len(y))
    for _ in range(30):
        coef = _nonnegative_lstsq(x * weights[:, None], y * weights)
        weights = 1.0 / np.sqrt(np.maximum(np.abs(y - x @ coef), 1e-3 * max(float(np.median(np.abs(y))), 1e-9)))
    predicted = x @ coef
    ok = predicted > 0
    ratios = y[ok] / predicted[ok] if ok.any() else np.ones(1)
    ratios = np.clip(ratios, 1e-3, None)
    quantiles = np.quantile(ratios, np.linspace(0.0, 1.0, RESIDUAL_QUANTILES)) if len(ratios) > 1 else ratios
    mape = float(np.mean(np.abs(y[ok] - predicted[ok]) / np.maximum(y[ok], 1e-9))) if ok.any() else 0.0
    ranges = {t: (float(x[:, i].min()), float(x[:, i].max())) for i, t in enumerate(terms) if t != "const"}
    return Fit(tuple(terms), tuple(float(c) for c in coef), tuple(float(q) for q in quantiles), len(rows), mape, ranges)


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Active set: drop the most negative term and refit until no coefficient is negative."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        solution, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (solution >= 0).all():
            coef[active] = solution
            break
        active.pop(int(np.argmin(solution)))
    return coef


def constant(ms: float) -> Fit:
    return Fit(("const",), (float(ms),))


@dataclasses.dataclass(frozen=True)
class EncodeProfile:
    tower_ms: Fit          # one tower call: const, images, megapixels (occupies the replica)
    call_ms: Fit           # the rest of an Encode RPC (decode, cache lookup / put, gRPC): const, images
    hit_call_ms: Fit       # an Encode RPC whose images are all cached: const, images
    tokens_per_image: int  # image tokens at keep ratio 1


@dataclasses.dataclass(frozen=True)
class PrefillProfile:
    compute_ms: Fit        # model-thread time: const, tokens (computed), tokens_sq (= tokens^2 / 1000), cached_tokens
    call_ms: Fit           # the rest of a Prefill RPC (embedding fetch, KV publish tail, gRPC): const, tokens,
                           # images (profiles before 2026-12-06: const, tokens)
    block_tokens: int      # prefix-cache block size of the profiled deployment (0 = off)
    fastkv_compute_ms: Fit | None = None  # with FastKV at the deployment's rates: const, tokens, tokens_sq
                                          # (None: not profiled, or the model refuses FastKV)
    fastkv_kv_fraction: float = 1.0       # KV rows FastKV keeps per prompt row (what decode then holds)

    def compute_fit(self, fastkv: bool) -> Fit:
        """The compute-time fit of a prefill with or without FastKV (which never reads the prefix cache)."""
        if not fastkv:
            return self.compute_ms
        if self.fastkv_compute_ms is None:
            raise ValueError("this profile has no FastKV prefill measurements (profile a deployment whose model "
                             "supports FastKV with a current `tuner profile`)")
        return self.fastkv_compute_ms

    def compute_ms_for(self, tokens: int, cached_tokens: int, fastkv: bool) -> float:
        """Predicted compute time of a prompt of `tokens` rows, `cached_tokens` of them from the prefix
        cache (ignored with FastKV: it computes the whole prompt)."""
        cached = 0 if fastkv else cached_tokens
        computed = tokens - cached
        return self.compute_fit(fastkv).predict(tokens=computed, tokens_sq=computed * computed / 1000.0,
                                                cached_tokens=cached)

    def kv_rows(self, prompt_tokens: int, fastkv: bool) -> int:
        """KV rows decode holds for a prompt (fewer with FastKV's compression)."""
        return max(1, math.ceil(prompt_tokens * self.fastkv_kv_fraction)) if fastkv else prompt_tokens


@dataclasses.dataclass(frozen=True)
class DecodeProfile:
    step_ms: Fit           # one batched step: const, batch, context (sum of the batch's KV rows)
    join_ms: Fit           # first token at the client -> first decode step starts (call, KV fetch, queue, and
                           # the stream's lag to the client): const, kv_tokens
    max_running: int
    kv_capacity_tokens: int


@dataclasses.dataclass(frozen=True)
class Profile:
    model: str
    max_context: int
    router_ms: Fit         # router work before the first token outside the stage RPCs: const, prompt_tokens,
                           # images, megapixels (the image bytes it forwards; before 2026-12-06: const, prompt_tokens)
    encode: EncodeProfile
    prefill: PrefillProfile
    decode: DecodeProfile
    measured_on: str = ""  # hardware, e.g. "2-core CPU (Debian, no GPU)" or "1x NVIDIA H200"
    measured_at: str = ""  # ISO date
    host_cores: int = 0    # > 0: every replica of the profiled deployment shared this many CPU cores
    idle_cores_per_process: float = 0.0  # shared host: CPU an idle service process (router or replica) keeps
                                         # using (health and load polling, heartbeats, gRPC's timers)
    notes: str = ""

    def cores_for_work(self, processes: int) -> float:
        """On a shared host, the cores a deployment of `processes` service processes leaves to busy
        work: the host's less what every process uses while idle (at least a tenth of the host).
        0 when each replica has its own accelerator."""
        if self.host_cores <= 0:
            return 0.0
        return max(self.host_cores - processes * self.idle_cores_per_process, 0.1 * self.host_cores)

    def image_tokens(self, keep_ratio: float = 1.0) -> int:
        return max(1, round(self.encode.tokens_per_image * keep_ratio))

    def to_json(self) -> dict:
        def encode(value):
            if isinstance(value, Fit):
                return value.to_json()
            if dataclasses.is_dataclass(value):
                return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
            return value
        return {"version": PROFILE_VERSION, **encode(self)}

    @classmethod
    def from_json(cls, data: Mapping) -> Profile:
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile version {data.get('version')!r} is not supported (expected {PROFILE_VERSION})")
        return _decode(cls, data)

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Profile:
        try:
            return cls.from_json(json.loads(pathlib.Path(path).read_text()))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a tuner profile ({exc})") from exc


def _decode(kind, data: Mapping):
    if kind is Fit:
        return Fit.from_json(data)
    values = {}
    for f in dataclasses.fields(kind):
        if f.name not in data:
            continue
        field_type = {"Fit": Fit, "Fit | None": Fit, "EncodeProfile": EncodeProfile, "PrefillProfile": PrefillProfile,
                      "DecodeProfile": DecodeProfile}.get(str(f.type))
        value = data[f.name]
        values[f.name] = _decode(field_type, value) if field_type and value is not None else value
    return kind(**values)


BUNDLED = pathlib.Path(__file__).parent / "profiles"


def bundled_profiles() -> dict[str, pathlib.Path]:
    return {p.stem: p for p in sorted(BUNDLED.glob("*.json"))}


def load_profile(name_or_path: str) -> Profile:
    """A profile file, or the name of one shipped with the package (`bundled_profiles()`)."""
    bundled = bundled_profiles()
    if name_or_path in bundled:
        return Profile.load(bundled[name_or_path])
    path = pathlib.Path(name_or_path)
    if not path.exists():
        raise ValueError(f"profile {name_or_path!r}: no such file or bundled profile (bundled: {sorted(bundled)})")
    return Profile.load(path)
