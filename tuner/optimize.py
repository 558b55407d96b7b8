"""`tuner optimize`: the cheapest E/P/D deployment that meets percentile SLOs on a trace.

An Optuna study searches replicas per stage and per-stage settings, and, when asked, whether encode
runs on its own replicas or colocated on the prefill replicas (E+P: then no encode replica count is
suggested, a conditional parameter). Each trial is scored on the discrete-event simulation
(`tuner.sim`) of the whole trace; every SLO is one Optuna constraint (predicted percentile - target
<= 0); the objective is the deployment's cost (GPUs, or $/h with a GPU price), or, in Pareto mode,
cost and the first SLO's percentile together. A closed-form
pre-filter (a stage that cannot keep up with the trace's work even fully batched, or a percentile
that misses the SLO even with no queueing at all) scores hopeless trials without simulating them.
The best candidates are then simulated again under several noise seeds (the uncertainty band)
and at rising rates (the headroom: the largest rate multiple that still meets every SLO). A stored
study resumes by name (the name digests the trace, profile, SLOs and search space); a study from
before the E+P knob resumes under a separate-only space, its trials read as separate encode.

Invariant: a candidate is reported feasible only if its simulated percentiles meet every SLO; a
trial that raises is recorded as FAIL with its reason and the study goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from tuner.profile import Profile
from tuner.sim import TRACE_BLOCK_TOKENS, Candidate, SimResult, batched_tower_ms, simulate
from tuner.synth import rescale
from tuner.traces import TraceRequest

METRICS = ("ttft", "tpot", "e2e")
_DURATION = re.compile(r"^([0-9]*\.?[0-9]+)\s*(ms|s)?$")


@dataclasses.dataclass(frozen=True)
class Slo:
    metric: str          # ttft | tpot | e2e
    percentile: float    # 50, 90, 99, ...
    target_s: float

    def label(self) -> str:
        return f"{self.metric}:p{self.percentile:g}<={_fmt_s(self.target_s)}"

    def key(self) -> str:
        return f"{self.metric}_p{self.percentile:g}"


def parse_slo(text: str) -> Slo:
    """"ttft=2s", "tpot=50ms", "e2e:p99=20s" (percentile defaults to p90)."""
    name, sep, value = text.partition("=")
    metric, _, pct = name.strip().lower().partition(":")
    if not sep or metric not in METRICS:
        raise ValueError(f"--slo {text!r}: expected METRIC[:pNN]=DURATION with METRIC one of {', '.join(METRICS)}")
    percentile = 90.0
    if pct:
        if not re.fullmatch(r"p[0-9]+(\.[0-9]+)?", pct) or not 0 < float(pct[1:]) < 100:
            raise ValueError(f"--slo {text!r}: percentile must look like p50, p90 or p99 (got {pct!r})")
        percentile = float(pct[1:])
    match = _DURATION.match(value.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--slo {text!r}: duration must be positive, like 2s or 50ms (got {value!r})")
    seconds = float(match.group(1)) / (1000.0 if match.group(2) == "ms" else 1.0)
    return Slo(metric, percentile, seconds)


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    max_replicas: int = 8                         # per stage
    gpus: int = 0                                 # total GPU budget (0 = no budget)
    gpus_per_replica: tuple[int, int, int] = (1, 1, 1)  # encode, prefill, decode
    gpu_hour_price: float = 0.0                   # > 0: the objective is $/h instead of GPUs
    encode_max_batch: tuple[int, ...] = (8, 16, 32, 64)
    encode_max_wait_ms: tuple[float, ...] = (0.0, 2.0, 5.0, 10.0)
    decode_max_running: tuple[int, ...] = (16, 32, 64, 128, 256)
    image_keep_ratio: tuple[float, ...] = (1.0,)  # lossless unless the user allows sparsification
    fastkv: tuple[bool, ...] = (False,)           # lossless unless the user allows FastKV
    local_prefill_tokens: tuple[int, ...] = (0, 512, 2048)   # router E -> PD threshold (0 = off; lossless)
    encode_colocated: tuple[bool, ...] = (False,)  # encode placements: own replicas (False), E+P (True);
                                                   # (False, True) searches both (`tuner optimize`'s default)

    def cost(self, candidate: Candidate) -> float:
        gpus = candidate.gpus(self.gpus_per_replica)
        return gpus * self.gpu_hour_price if self.gpu_hour_price > 0 else float(gpus)


@dataclasses.dataclass
class Scored:
    """A candidate's predicted metrics (seconds), feasibility and diagnosis."""
    candidate: Candidate
    cost: float
    metrics: dict[str, float]
    slack: dict[str, float]        # SLO label -> (target - predicted) / target (>= 0 meets it)
    bottleneck: str
    utilization: dict[str, float]
    prefiltered: str = ""          # why the simulator was skipped
    spread: dict[str, float] = dataclasses.field(default_factory=dict)   # metric -> half-range over noise seeds
    headroom: float = math.nan     # largest rate multiple meeting every SLO

    @property
    def feasible(self) -> bool:
        return not self.prefiltered and all(v >= 0 for v in self.slack.values())


def summarize_result(result: SimResult) -> dict[str, float]:
    metrics = {}
    for metric in METRICS:
        for q in (50, 90, 99):
            metrics[f"{metric}_p{q}"] = result.percentile(metric, q)
        metrics[f"{metric}_mean"] = result.mean(metric)
    metrics["rejected"] = float(result.rejected)
    return metrics


def _metric(metrics: dict[str, float], slo: Slo) -> float:
    key = slo.key()
    return metrics[key] if key in metrics else math.inf


class Objective:
    """Scores candidates for one (trace, profile, SLOs, search space)."""

    def __init__(self, requests: Sequence[TraceRequest], profile: Profile, slos: Sequence[Slo],
                 space: SearchSpace, *, seed: int = 0) -> None:
        if not slos:
            raise ValueError("at least one SLO is needed (e.g. --slo ttft=2s)")
        self.requests, self.profile, self.slos, self.space, self.seed = list(requests), profile, list(slos), space, seed
        self.bounds = WorkloadBounds(self.requests, profile)

    def score(self, candidate: Candidate, *, simulate_hopeless: bool = False) -> Scored:
        cost = self.space.cost(candidate)
        reason = "" if simulate_hopeless else self.bounds.hopeless(candidate, self.slos)
        if reason:
            return Scored(candidate, cost, {}, {s.label(): -1.0 for s in self.slos}, reason.split(":")[0], {}, reason)
        result = simulate(self.requests, self.profile, candidate, seed=self.seed)
        metrics = summarize_result(result)
        slack = {s.label(): (s.target_s - _metric(metrics, s)) / s.target_s for s in self.slos}
        return Scored(candidate, cost, metrics, slack, result.bottleneck(), result.utilization())

    def refine(self, scored: Scored, *, seeds: int = 5, max_multiple: float = 8.0) -> Scored:
        """The noise band (half-range of each metric over `seeds` simulations) and the headroom."""
        runs = [summarize_result(simulate(self.requests, self.profile, scored.candidate, seed=self.seed + k))
                for k in range(seeds)]
        scored.spread = {key: (max(r[key] for r in runs) - min(r[key] for r in runs)) / 2.0 for key in runs[0]}
        scored.headroom = self.headroom(scored.candidate, max_multiple)
        return scored

    def meets(self, candidate: Candidate, requests: Sequence[TraceRequest]) -> bool:
        metrics = summarize_result(simulate(requests, self.profile, candidate, seed=self.seed))
        return all(_metric(metrics, s) <= s.target_s for s in self.slos)

    def headroom(self, candidate: Candidate, max_multiple: float) -> float:
        """Bisection on the arrival-rate multiple (the trace time-compressed) that still meets every
        SLO; 0 when even the trace's own rate misses."""
        if not self.meets(candidate, self.requests):
            return 0.0
        rate = self.bounds.rate_rps
        low, high = 1.0, max_multiple
        if self.meets(candidate, rescale(self.requests, rate * high)):
            return high
        for _ in range(6):
            mid = math.sqrt(low * high)
            if self.meets(candidate, rescale(self.requests, rate * mid)):
                low = mid
            else:
                high = mid
        return low


class WorkloadBounds:
    """Closed-form facts about a trace on a profile: each stage's total service work if perfectly
    batched (a lower bound), and each request's latency with no queueing at all. Requests beyond the
    model's context are left out (the router refuses them; the simulation counts them rejected)."""

    def __init__(self, requests: Sequence[TraceRequest], profile: Profile) -> None:
        self.profile = profile
        arrivals = [r.arrival_s for r in requests]
        self.duration_s = max(max(arrivals) - min(arrivals), 1e-9) if requests else 1e-9
        self.rate_rps = len(requests) / self.duration_s if requests else 0.0
        image_tokens = profile.image_tokens()
        requests = [r for r in requests
                    if r.context_tokens + r.num_images * image_tokens + r.generated_tokens <= profile.max_context]
        self.requests = list(requests)
        distinct = {i.hash: i.megapixels for r in requests for i in r.images}
        self.distinct_images, self.distinct_megapixels = len(distinct), sum(distinct.values())
        self.output_tokens = sum(max(r.generated_tokens - 1, 0) for r in requests)
        self.prefix_hits = _prefix_hits(requests)

    def utilization(self, candidate: Candidate) -> dict[str, float]:
        """Lower bounds of each stage's utilization (fully batched, unlimited caches)."""
        p, c = self.profile, candidate
        encode_ms = batched_tower_ms(p.encode.tower_ms, self.distinct_images, self.distinct_megapixels,
                                     c.encode_max_batch)
        prefill_ms = sum(self._prefill_ms(r, c, hits) for r, hits in zip(self.requests, self.prefix_hits)
                         if not self._may_prefill_locally(r, c))   # a lower bound: those may all go E -> PD
        step = p.decode.step_ms
        batch = max(1, c.decode_max_running)
        per_token_ms = step.predict(batch=batch, context=0) / batch
        decode_ms = self.output_tokens * per_token_ms
        span_ms = self.duration_s * 1000.0
        if c.encode_colocated:   # encode loads the prefill replicas: its share of them, and their whole load
            return {"encode": encode_ms / (span_ms * c.prefill_replicas),
                    "prefill": (encode_ms + prefill_ms) / (span_ms * c.prefill_replicas),
                    "decode": decode_ms / (span_ms * c.decode_replicas)}
        return {"encode": encode_ms / (span_ms * c.encode_replicas),
                "prefill": prefill_ms / (span_ms * c.prefill_replicas),
                "decode": decode_ms / (span_ms * c.decode_replicas)}

    def _may_prefill_locally(self, r: TraceRequest, c: Candidate) -> bool:
        return r.context_tokens + r.num_images * self.profile.image_tokens(c.image_keep_ratio) <= c.local_prefill_tokens

    def _prefill_ms(self, r: TraceRequest, c: Candidate, hits: int) -> float:
        prompt = r.context_tokens + r.num_images * self.profile.image_tokens(c.image_keep_ratio)
        cached = min(hits * TRACE_BLOCK_TOKENS, prompt - 1) if c.prefix_cache else 0
        return self.profile.prefill.compute_ms_for(prompt, cached, c.fastkv)

    def unloaded(self, candidate: Candidate) -> dict[str, np.ndarray]:
        """Per request: TTFT, TPOT and e2e (seconds) if it were alone in the deployment (the same with
        encode colocated: alone, its tower batch and its prefill follow each other on one thread
        exactly as they would on two)."""
        p = self.profile
        ttft, tpot, e2e = [], [], []
        for r, hits in zip(self.requests, self.prefix_hits):
            prompt = r.context_tokens + r.num_images * p.image_tokens(candidate.image_keep_ratio)
            local = self._may_prefill_locally(r, candidate)   # E -> PD: no prefill call, no KV hand-off
            mp = r.megapixels
            ms = p.router_ms.predict(prompt_tokens=prompt, images=r.num_images, megapixels=mp)
            ms += self._prefill_ms(r, candidate, hits)
            ms += 0.0 if local else p.prefill.call_ms.predict(tokens=prompt, images=r.num_images)
            if r.images:
                ms += p.encode.tower_ms.predict(images=r.num_images, megapixels=mp)
                ms += p.encode.call_ms.predict(images=r.num_images, megapixels=mp)
            kv_rows = p.prefill.kv_rows(prompt, candidate.fastkv)
            step = p.decode.step_ms.predict(batch=1, context=kv_rows)
            join = 0.0 if local else p.decode.join_ms.predict(kv_tokens=kv_rows)
            rest = join + step * max(r.generated_tokens - 1, 0)
            ttft.append(ms / 1000.0)
            tpot.append(rest / max(r.generated_tokens - 1, 1) / 1000.0)
            e2e.append((ms + rest) / 1000.0)
        return {"ttft": np.array(ttft), "tpot": np.array(tpot), "e2e": np.array(e2e)}

    def hopeless(self, candidate: Candidate, slos: Sequence[Slo]) -> str:
        """Why this candidate cannot meet the SLOs, or "" when it has to be simulated."""
        used = self.utilization(candidate)
        if candidate.encode_colocated:
            del used["encode"]   # part of the prefill replicas' load, judged there
        for stage, rho in used.items():
            if rho > 1.1:  # even perfectly batched, the stage falls further behind with every request
                return f"{stage}: needs {rho:.2f}x its capacity"
        unloaded = self.unloaded(candidate)
        for slo in slos:
            alone = float(np.percentile(unloaded[slo.metric], slo.percentile)) if len(self.requests) else 0.0
            if alone > slo.target_s:
                return f"{slo.metric}: p{slo.percentile:g} is {_fmt_s(alone)} with no queueing at all"
        return ""


def _prefix_hits(requests: Sequence[TraceRequest]) -> list[int]:
    """Leading prefix blocks of each request already seen (unbounded cache), in arrival order."""
    seen: set[int] = set()
    hits = []
    for r in sorted(requests, key=lambda r: r.arrival_s):
        count = 0
        for block in r.prefix_blocks:
            if block not in seen:
                break
            count += 1
        hits.append(count)
        seen.update(r.prefix_blocks)
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    by_index = [0] * len(requests)
    for position, index in enumerate(order):
        by_index[index] = hits[position]
    return by_index


def rate_matched(bounds: WorkloadBounds, space: SearchSpace, target_utilization: float = 0.6, *,
                 colocated: bool = False) -> Candidate:
    """The closed-form starting point: each stage's replicas so that its batched utilization is
    about `target_utilization` (Dynamo-planner style rate matching), within the space's bounds.
    Colocated, the prefill replicas are matched to the encode and prefill work together."""
    base = Candidate(0 if colocated else 1, 1, 1, encode_max_batch=max(space.encode_max_batch),
                     encode_max_wait_ms=sorted(space.encode_max_wait_ms)[len(space.encode_max_wait_ms) // 2],
                     decode_max_running=max(space.decode_max_running), image_keep_ratio=max(space.image_keep_ratio),
                     encode_colocated=colocated)
    rho = bounds.utilization(base)
    count = {stage: min(space.max_replicas, max(1, math.ceil(value / target_utilization)))
             for stage, value in rho.items()}
    return dataclasses.replace(base, encode_replicas=0 if colocated else count["encode"],
                               prefill_replicas=count["prefill"], decode_replicas=count["decode"])


def first_trials(bounds: WorkloadBounds, space: SearchSpace) -> list[Candidate]:
    """The trials a new study starts with: the rate-matched candidate of each encode placement the
    space allows, separate first. Both, not the cheaper: colocation trades encode GPUs for
    contention the closed form cannot see, so neither seed dominates, and TPE then has one good
    sample on each side of the conditional space."""
    return [rate_matched(bounds, space, colocated=colocated) for colocated in sorted(set(space.encode_colocated))]


def study_name(requests: Sequence[TraceRequest], profile: Profile, slos: Sequence[Slo], space: SearchSpace,
               pareto: bool) -> str:
    """One study per (trace, profile, SLOs, search space, mode): resuming never mixes them."""
    digest = hashlib.sha256()
    digest.update(json.dumps([[r.arrival_s, r.context_tokens, r.generated_tokens, list(r.prefix_blocks),
                               [i.hash for i in r.images]] for r in requests]).encode())
    digest.update(json.dumps(profile.to_json(), sort_keys=True).encode())
    digest.update(json.dumps([dataclasses.asdict(s) for s in slos]).encode())
    fields = dataclasses.asdict(space)
    if fields["encode_colocated"] == (False,):
        del fields["encode_colocated"]   # the space before the E+P knob: its studies keep their names
    digest.update(json.dumps(fields).encode())
    return f"epdserve-{'pareto' if pareto else 'cost'}-{digest.hexdigest()[:12]}"


def suggest(trial, space: SearchSpace) -> Candidate:
    """The trial's candidate, define-by-run: encode_replicas is suggested only for separate encode
    (a colocated trial has no such parameter; its candidate has 0)."""
    colocated = trial.suggest_categorical("encode_colocated", list(space.encode_colocated))
    encode = 0 if colocated else trial.suggest_int("encode_replicas", 1, space.max_replicas)
    return Candidate(
        encode, trial.suggest_int("prefill_replicas", 1, space.max_replicas),
        trial.suggest_int("decode_replicas", 1, space.max_replicas),
        encode_max_batch=trial.suggest_categorical("encode_max_batch", list(space.encode_max_batch)),
        encode_max_wait_ms=trial.suggest_categorical("encode_max_wait_ms", list(space.encode_max_wait_ms)),
        decode_max_running=trial.suggest_categorical("decode_max_running", list(space.decode_max_running)),
        image_keep_ratio=trial.suggest_categorical("image_keep_ratio", list(space.image_keep_ratio)),
        fastkv=trial.suggest_categorical("fastkv", list(space.fastkv)),
        local_prefill_tokens=trial.suggest_categorical("local_prefill_tokens", list(space.local_prefill_tokens)),
        encode_colocated=colocated,
    )


def candidate_params(candidate: Candidate) -> dict:
    """The searched fields of a candidate (trial parameters, candidates.json); `candidate_from_params`
    reverses it."""
    return {"encode_replicas": candidate.encode_replicas, "prefill_replicas": candidate.prefill_replicas,
            "decode_replicas": candidate.decode_replicas, "encode_max_batch": candidate.encode_max_batch,
            "encode_max_wait_ms": candidate.encode_max_wait_ms, "decode_max_running": candidate.decode_max_running,
            "image_keep_ratio": candidate.image_keep_ratio, "fastkv": candidate.fastkv,
            "local_prefill_tokens": candidate.local_prefill_tokens, "encode_colocated": candidate.encode_colocated}


def candidate_from_params(params: Mapping) -> Candidate:
    """The candidate of `candidate_params` output or of a trial's params, where a colocated trial has
    no encode_replicas (0) and a trial of a study from before the E+P knob no encode_colocated (False)."""
    colocated = bool(params.get("encode_colocated", False))
    values = {key: params[key] for key in candidate_params(Candidate()) if key in params}
    return Candidate(**{**values, "encode_colocated": colocated, **({"encode_replicas": 0} if colocated else {})})


@dataclasses.dataclass
class StudyOutcome:
    study: object
    ranked: list[Scored]           # feasible candidates, cheapest first (refined)
    closest: list[Scored]          # when nothing is feasible: the candidates that came closest
    interrupted: bool = False


def run_study(objective: Objective, *, trials: int, storage: str | None = None, pareto: bool = False,
              seed: int = 0, top: int = 5, progress: bool = True,
              on_trial: Callable[[Scored], None] = lambda _: None) -> StudyOutcome:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = objective.space
    name = study_name(objective.requests, objective.profile, objective.slos, space, pareto)
    sampler = _sampler(space, seed)
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, load_if_exists=True,
                                directions=["minimize", "minimize"] if pareto else ["minimize"])
    if not study.trials:
        for candidate in first_trials(objective.bounds, space):
            study.enqueue_trial(candidate_params(candidate))
    scored: dict[int, Scored] = {}

    def run_trial(trial) -> float | tuple[float, float]:
        candidate = suggest(trial, space)
        if space.gpus and candidate.gpus(space.gpus_per_replica) > space.gpus:
            result = Scored(candidate, space.cost(candidate), {}, {s.label(): -1.0 for s in objective.slos}, "budget",
                            {}, f"budget: {candidate.gpus(space.gpus_per_replica)} GPUs > {space.gpus}")
        else:
            result = objective.score(candidate)
        scored[trial.number] = result
        _record(trial, result, objective.slos)
        on_trial(result)
        if pareto:
            first = objective.slos[0]
            return result.cost, min(_metric(result.metrics, first), 1e6) if result.metrics else 1e6
        return result.cost

    done = [t for t in study.trials if t.state.is_finished()]
    remaining = max(0, trials - len(done))
    interrupted = False
    try:
        study.optimize(run_trial, n_trials=remaining, catch=(Exception,), show_progress_bar=progress)
    except KeyboardInterrupt:
        interrupted = True
    candidates = [_from_trial(t, objective) for t in study.trials if t.state.name == "COMPLETE"]
    feasible = sorted((s for s in candidates if s.feasible), key=lambda s: (s.cost, -min(s.slack.values())))
    ranked = [objective.refine(s) for s in _distinct(feasible)[:top]]
    closest = [] if ranked else sorted((s for s in candidates if not s.prefiltered),
                                       key=lambda s: -min(s.slack.values()))[:top]
    return StudyOutcome(study, ranked, closest, interrupted)


def _sampler(space: SearchSpace, seed: int):
    """Multivariate TPE. When both encode placements are searched, encode_replicas exists only in
    separate trials: `group` has TPE model each set of parameters that occur together jointly,
    instead of the intersection over all trials (which would leave encode_replicas to a univariate
    model). A space without that condition keeps the sampler it always had (same trials per seed)."""
    import optuna

    conditional = len(set(space.encode_colocated)) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)   # multivariate and group are
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, group=conditional)


def _record(trial, result: Scored, slos: Sequence[Slo]) -> None:
    for slo in slos:  # feasible iff every value <= 0 (Optuna's constraint convention)
        trial.set_constraint(slo.label(), -result.slack[slo.label()])
    trial.set_user_attr("metrics", {k: (v if math.isfinite(v) else None) for k, v in result.metrics.items()})
    trial.set_user_attr("bottleneck", result.bottleneck)
    trial.set_user_attr("utilization", result.utilization)
    trial.set_user_attr("prefiltered", result.prefiltered)
    trial.set_user_attr("cost", result.cost)


def _from_trial(trial, objective: Objective) -> Scored:
    """A stored trial (this run's or a resumed study's) back as a Scored candidate."""
    candidate = candidate_from_params(trial.params)
    metrics = {k: (v if v is not None else math.inf) for k, v in trial.user_attrs.get("metrics", {}).items()}
    slack = {label: -value for label, value in (trial.constraints or {}).items()}
    return Scored(candidate, trial.user_attrs.get("cost", objective.space.cost(candidate)), metrics, slack,
                  trial.user_attrs.get("bottleneck", ""), trial.user_attrs.get("utilization", {}),
                  trial.user_attrs.get("prefiltered", ""))


def _distinct(scored: Sequence[Scored]) -> list[Scored]:
    seen, out = set(), []
    for s in scored:
        if s.candidate not in seen:
            seen.add(s.candidate)
            out.append(s)
    return out
