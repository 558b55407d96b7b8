"""The router's admission decision: Mooncake's early rejection at arrival (ALGORITHMS.md §7).

A request is admitted or rejected when it reaches the router, before any stage runs, from the loads
its replicas report. `PredictiveAdmission` judges decode load at the moment this request is
predicted to join decode (its prefill end); `CurrentLoadAdmission`, the baseline, judges the decode
load of now, and so cannot see the sequences already admitted upstream that will land first.

Invariant: a decision admits iff both checks pass, a check passing iff its SLO is 0 or the
prediction is within (1 - headroom) x SLO: TTFT on the prefill replica of least predicted TTFT, TPOT
on the decode replica of least predicted TPOT; a reject names every check it failed and a retry hint
in [min_retry_s, max_retry_s]. Both policies share the checks and differ only in the decode load they
judge. Everything here is pure: no I/O, no clock reads (`now` and every `*_at_s` are seconds on the
caller's clock), inputs never mutated, the same inputs give the same decision.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

SloName = Literal["ttft", "tpot"]


def _check_non_negative(obj: object) -> None:
    for field in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, field.name)
        if isinstance(value, (int, float)) and not value >= 0:
            raise ValueError(f"{type(obj).__name__}.{field.name} must be >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class SLO:
    """Latency objectives in seconds; 0 turns a check off."""

    ttft_s: float = 0.0   # time to first token, from arrival at the router
    tpot_s: float = 0.0   # mean time per output token after the first

    def __post_init__(self) -> None:
        _check_non_negative(self)


@dataclasses.dataclass(frozen=True)
class PrefillModel:
    """Seconds to prefill one prompt: a + b * uncached tokens (constants fitted from measured prefills)."""

    fixed_s: float        # a
    per_token_s: float    # b

    def __post_init__(self) -> None:
        _check_non_negative(self)

    def seconds(self, tokens: int) -> float:
        return self.fixed_s + self.per_token_s * tokens


@dataclasses.dataclass(frozen=True)
class DecodeModel:
    """Seconds of one decode step: c + d * batch + e * context tokens summed over the batch."""

    fixed_s: float                      # c
    per_seq_s: float                    # d
    per_context_token_s: float = 0.0    # e

    def __post_init__(self) -> None:
        _check_non_negative(self)

    def step_s(self, batch: float, context_tokens: float = 0) -> float:
        return self.fixed_s + self.per_seq_s * batch + self.per_context_token_s * context_tokens


@dataclasses.dataclass(frozen=True)
class PrefillState:
    """One prefill replica (FIFO, one prompt at a time) as its load report shows it."""

    model: PrefillModel
    queued_requests: int = 0     # prompts waiting behind the one in progress
    queued_tokens: int = 0       # their uncached tokens
    busy_until_s: float = 0.0    # predicted end of the prompt in progress; <= now when idle

    def __post_init__(self) -> None:
        if self.queued_requests < 0 or self.queued_tokens < 0:
            raise ValueError(f"PrefillState queue must be >= 0, got {self.queued_requests}, {self.queued_tokens}")

    def backlog_s(self, now: float) -> float:
        """Seconds from `now` until this replica could start a new prompt."""
        queued = self.queued_requests * self.model.fixed_s + self.queued_tokens * self.model.per_token_s
        return max(0.0, self.busy_until_s - now) + queued


Remaining = tuple[float, ...]   # equally likely values of the tokens a sequence has still to decode


def _as_remaining(value: float | Sequence[float]) -> Remaining:
    values = (float(value),) if isinstance(value, (int, float)) else tuple(value)
    if not values or min(values) < 0:
        raise ValueError(f"remaining_tokens needs at least one value, each >= 0, got {value!r}")
    return values


@dataclasses.dataclass(frozen=True)
class RunningSeq:
    """A sequence in a decode replica's batch. `remaining_tokens` is a point estimate or equally likely
    outcomes (e.g. OutputLengthModel.remaining_quantiles), so that predicted load decays smoothly."""

    remaining_tokens: Remaining | float
    context_tokens: int = 0      # prompt + tokens so far

    def __post_init__(self) -> None:
        object.__setattr__(self, "remaining_tokens", _as_remaining(self.remaining_tokens))


@dataclasses.dataclass(frozen=True)
class IncomingSeq:
    """A sequence admitted for this decode replica that is not in its batch yet: still in prefill
    (join_at_s = its predicted prefill end; treated as now once overdue) or, with `prefilled`, at the
    replica waiting for a slot."""

    join_at_s: float
    remaining_tokens: Remaining | float
    context_tokens: int = 0
    prefilled: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "remaining_tokens", _as_remaining(self.remaining_tokens))


@dataclasses.dataclass(frozen=True)
class DecodeState:
    """One decode replica (continuous batching) as the router sees it."""

    model: DecodeModel
    capacity: int                           # most sequences one step runs (the batch / KV limit)
    running: tuple[RunningSeq, ...] = ()
    incoming: tuple[IncomingSeq, ...] = ()

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"DecodeState.capacity must be >= 1, got {self.capacity}")

    def current_view(self) -> DecodeState:
        """What the replica itself holds now: the batch and the prefilled sequences waiting for a
        slot, without the sequences still in prefill."""
        return dataclasses.replace(self, incoming=tuple(s for s in self.incoming if s.prefilled))


@dataclasses.dataclass(frozen=True)
class AdmissionRequest:
    """The arriving request, as the router knows it before any stage runs."""

    prompt_tokens: int
    uncached_tokens: int            # prompt tokens not in the prefix cache (<= prompt_tokens)
    expected_output_tokens: float   # the router's estimate (it only knows max_tokens): min(max_tokens, the
                                    # mean of its OutputLengthModel), Mooncake's uniform decode length

    def __post_init__(self) -> None:
        _check_non_negative(self)
        if self.uncached_tokens > self.prompt_tokens:
            raise ValueError(f"uncached_tokens {self.uncached_tokens} > prompt_tokens {self.prompt_tokens}")

    @property
    def mean_context_tokens(self) -> float:
        """Its context averaged over its decode: what it adds to the step's context term."""
        return self.prompt_tokens + self.expected_output_tokens / 2


def predict_ttft(request: AdmissionRequest, prefill: PrefillState, now: float) -> float:
    """Seconds from `now` to the request's first token (its prefill end) if queued on `prefill` now."""
    return prefill.backlog_s(now) + prefill.model.seconds(request.uncached_tokens)


def _tpot_at(decode: DecodeState, sequences: float, context_tokens: float) -> float:
    """Seconds per token for each of `sequences` sharing the replica: a step over min(n, capacity)
    sequences, stretched by n / capacity when they do not all fit (they take turns)."""
    batch = min(sequences, decode.capacity)
    scale = batch / sequences if sequences else 1.0
    return decode.model.step_s(batch, context_tokens * scale) * max(1.0, sequences / decode.capacity)


@dataclasses.dataclass(frozen=True)
class LoadForecast:
    """A decode replica's expected load from times[0] (= now) on, piecewise constant and assuming no
    new admissions: from times[i] until times[i + 1] there are loads[i] expected sequences holding
    contexts[i] expected context tokens."""

    decode: DecodeState
    times: tuple[float, ...]
    loads: tuple[float, ...]
    contexts: tuple[float, ...]

    def segment(self, at_time: float) -> int:
        return max(0, bisect.bisect_right(self.times, at_time) - 1)

    def load_at(self, at_time: float) -> float:
        return self.loads[self.segment(at_time)]

    def tpot_with(self, context_tokens: float, at_time: float) -> float:
        """Seconds per token for one more sequence of `context_tokens` joining at `at_time`."""
        i = self.segment(at_time)
        return _tpot_at(self.decode, self.loads[i] + 1, self.contexts[i] + context_tokens)

    def clears_after(self, context_tokens: float, at_time: float, tpot_slo_s: float) -> float:
        """Seconds after `at_time` until one more sequence would decode within `tpot_slo_s` (inf if never)."""
        for i in range(self.segment(at_time), len(self.times)):
            if _tpot_at(self.decode, self.loads[i] + 1, self.contexts[i] + context_tokens) <= tpot_slo_s:
                return max(0.0, self.times[i] - at_time)
        return math.inf


def current_tpot_s(decode: DecodeState) -> float:
    """Seconds per token of the replica's current batch (prefilled sequences waiting for a slot
    included; at least one sequence)."""
    current = decode.current_view()
    context = sum(s.context_tokens for s in current.running) + sum(s.context_tokens for s in current.incoming)
    return _tpot_at(decode, max(1, len(current.running) + len(current.incoming)), context)


def forecast_decode_load(decode: DecodeState, now: float, token_s: float | None = None) -> LoadForecast:
    """Every outcome of every sequence as a span: it joins at `now` (running) or max(now, join_at_s)
    (incoming), and an outcome of r remaining tokens leaves r * token_s seconds later. `token_s`
    defaults to current_tpot_s; a policy that keeps the replica loaded up to a TPOT SLO passes
    max(that, SLO), since its own later admissions keep the steps about that slow."""
    step = current_tpot_s(decode) if token_s is None else token_s
    events: list[tuple[float, float, float]] = []    # (time, weight change, context change)
    for join, seq in [(now, s) for s in decode.running] + [(max(now, s.join_at_s), s) for s in decode.incoming]:
        weight = 1.0 / len(seq.remaining_tokens)
        events.append((join, 1.0, float(seq.context_tokens)))
        events.extend((join + r * step, -weight, -weight * seq.context_tokens) for r in seq.remaining_tokens)
    events.sort()
    times, loads, contexts = [now], [0.0], [0.0]
    load = context = 0.0
    for t, dw, dctx in events:
        load, context = load + dw, context + dctx
        if t != times[-1]:
            times.append(t)
            loads.append(load)
            contexts.append(context)
        else:
            loads[-1], contexts[-1] = load, context
    return LoadForecast(decode, tuple(times), tuple(loads), tuple(contexts))


def predict_decode_load(decode: DecodeState, at_time: float, now: float, token_s: float | None = None) -> float:
    """Expected sequences at the replica at `at_time` (>= now), not counting the request being
    decided: running ones not yet finished, plus incoming ones that joined by then and have not
    finished (see forecast_decode_load). Not capped by capacity (the excess waits for a slot)."""
    return forecast_decode_load(decode, now, token_s).load_at(at_time)


def predict_tpot(request: AdmissionRequest, decode: DecodeState, at_time: float, now: float,
                 token_s: float | None = None) -> float:
    """Predicted seconds per output token for `request` if it joins `decode` at `at_time` (>= now),
    from the expected load then (see forecast_decode_load)."""
    return forecast_decode_load(decode, now, token_s).tpot_with(request.mean_context_tokens, at_time)


@dataclasses.dataclass(frozen=True)
class Decision:
    """An admission decision; indices are positions in the state sequences passed to `decide`."""

    admit: bool
    prefill_index: int | None             # the replica to prefill on (least predicted TTFT)
    decode_index: int | None              # the replica to decode on
    predicted_ttft_s: float               # on prefill_index, from now
    predicted_tpot_s: float               # on decode_index, at the policy's judging time
    rejected_by: tuple[SloName, ...] = ()  # the SLOs failed, "ttft" before "tpot"; empty iff admit
    reason: str = ""                       # one line for a log or a RESOURCE_EXHAUSTED message
    retry_after_s: float = 0.0            # 0 on admit; else when predicted load falls back under the SLO


@dataclasses.dataclass(frozen=True)
class AdmissionConfig:
    """What both policies are held to. A prediction is an estimate of the mean; admitting right up to
    the SLO leaves about half the admitted requests above it once load noise and prediction error
    play out, so a check passes only within (1 - headroom) x SLO."""

    slo: SLO
    headroom: float = 0.1        # fraction of each SLO kept free for prediction error, in [0, 1)
    min_retry_s: float = 0.5     # retry hints are clamped to [min_retry_s, max_retry_s]
    max_retry_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.headroom < 1:
            raise ValueError(f"AdmissionConfig.headroom must be in [0, 1), got {self.headroom}")
        if not 0 <= self.min_retry_s <= self.max_retry_s:
            raise ValueError(f"need 0 <= min_retry_s <= max_retry_s, got {self.min_retry_s}, {self.max_retry_s}")

    @property
    def limits(self) -> SLO:
        """The SLO less the headroom: the bounds the predictions are checked against."""
        keep = 1.0 - self.headroom
        return SLO(self.slo.ttft_s * keep, self.slo.tpot_s * keep)


class AdmissionPolicy(Protocol):
    name: str

    def decide(self, request: AdmissionRequest, prefill_states: Sequence[PrefillState],
               decode_states: Sequence[DecodeState], now: float) -> Decision:
        """Admit or reject `request` arriving at `now`. Pure: reads only its arguments and the policy's
        frozen config, mutates nothing. Raises ValueError when either state list is empty."""
        ...


class PredictiveAdmission:
    """Mooncake's prediction-based early rejection: predicted TTFT on the best prefill replica, and
    predicted TPOT on the best decode replica at the moment this request's prefill ends."""

    name = "predictive"

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config

    def decide(self, request: AdmissionRequest, prefill_states: Sequence[PrefillState],
               decode_states: Sequence[DecodeState], now: float) -> Decision:
        return _decide(self.config, request, prefill_states, decode_states, now, judge_at=None)


class CurrentLoadAdmission:
    """The baseline (Mooncake's plain early rejection): the same checks on the loads of now. The TPOT
    is that of the decode replicas' current batches (plus prefilled sequences waiting for a slot),
    blind to sequences still in prefill that will land before this request does."""

    name = "current-load"

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config

    def decide(self, request: AdmissionRequest, prefill_states: Sequence[PrefillState],
               decode_states: Sequence[DecodeState], now: float) -> Decision:
        views = [state.current_view() for state in decode_states]
        return _decide(self.config, request, prefill_states, views, now, judge_at=now)


def _decide(config: AdmissionConfig, request: AdmissionRequest, prefill_states: Sequence[PrefillState],
            decode_states: Sequence[DecodeState], now: float, judge_at: float | None) -> Decision:
    """Shared by both policies: TPOT judged at `judge_at`, or at the predicted join time when None."""
    if not prefill_states or not decode_states:
        raise ValueError("admission needs at least one prefill and one decode replica")
    ttfts = [predict_ttft(request, state, now) for state in prefill_states]
    p = min(range(len(ttfts)), key=ttfts.__getitem__)
    at = now + ttfts[p] if judge_at is None else judge_at
    forecasts = [forecast_decode_load(state, now, _token_s(state, config.limits)) for state in decode_states]
    tpots = [f.tpot_with(request.mean_context_tokens, at) for f in forecasts]
    d = min(range(len(tpots)), key=tpots.__getitem__)
    limits = config.limits
    failed = _failed(limits, ttfts[p], tpots[d])
    if not failed:
        return Decision(True, p, d, ttfts[p], tpots[d])
    wait = 0.0
    if "ttft" in failed:   # the backlog drains in real time
        wait = ttfts[p] - limits.ttft_s
    if "tpot" in failed:
        wait = max(wait, min(f.clears_after(request.mean_context_tokens, at, limits.tpot_s) for f in forecasts))
    wait = min(config.max_retry_s, max(config.min_retry_s, wait))
    return Decision(False, p, d, ttfts[p], tpots[d], failed, _reason(limits, ttfts[p], tpots[d], failed), wait)


def _token_s(decode: DecodeState, limits: SLO) -> float:
    return max(current_tpot_s(decode), limits.tpot_s)


def _failed(slo: SLO, ttft_s: float, tpot_s: float) -> tuple[SloName, ...]:
    failed: list[SloName] = []
    if slo.ttft_s > 0 and ttft_s > slo.ttft_s:
        failed.append("ttft")
    if slo.tpot_s > 0 and tpot_s > slo.tpot_s:
        failed.append("tpot")
    return tuple(failed)


def _reason(limits: SLO, ttft_s: float, tpot_s: float, failed: tuple[SloName, ...]) -> str:
    parts = {"ttft": f"predicted TTFT {ttft_s:.3f} s > {limits.ttft_s:.3f} s (TTFT SLO less headroom)",
             "tpot": f"predicted TPOT {tpot_s * 1e3:.1f} ms > {limits.tpot_s * 1e3:.1f} ms (TPOT SLO less headroom)"}
    return "; ".join(parts[name] for name in failed)


@dataclasses.dataclass(frozen=True)
class OutputLengthModel:
    """The router's distribution of output lengths (tokens, first token included), for its
    remaining-token estimates: it only knows max_tokens, so it predicts from history. Mooncake assumes
    one uniform decode time; a distribution also says how long a sequence that has outlived the mean
    still has to go, and lets predicted load decay smoothly."""

    lengths: tuple[int, ...]          # distinct, ascending, each >= 1
    cumulative: tuple[float, ...]     # cumulative[i] = P(L <= lengths[i]); the last is 1
    tail_tokens: tuple[float, ...]    # tail_tokens[i] = E[L; L >= lengths[i]]; one longer than lengths

    @classmethod
    def from_samples(cls, samples: Sequence[int]) -> OutputLengthModel:
        """Equal weight per sample. Raises ValueError on an empty sample or a length < 1."""
        return cls.from_observations(samples, ())

    @classmethod
    def from_observations(cls, completed: Sequence[int], still_running: Sequence[int],
                          tail_floor: int = 1) -> OutputLengthModel:
        """Kaplan-Meier over one cohort of requests: `completed` lengths, and `still_running` tokens
        emitted so far by those not finished (their length is larger: right-censored). Completed
        requests alone are the short ones early on; censoring removes that bias. The mass beyond the
        longest observation goes to max(longest + 1, tail_floor). Raises ValueError when `completed`
        and `still_running` are both empty or a completed length is < 1."""
        if not completed and not still_running or (completed and min(completed) < 1):
            raise ValueError("OutputLengthModel needs at least one observation, each completed length >= 1")
        counts: dict[int, list[int]] = {}
        for length in completed:
            counts.setdefault(length, [0, 0])[0] += 1
        for emitted in still_running:
            counts.setdefault(max(0, emitted), [0, 0])[1] += 1
        at_risk, survival, masses = len(completed) + len(still_running), 1.0, {}
        for length in sorted(counts):
            done, censored = counts[length]
            if done:
                masses[length] = survival * done / at_risk
                survival -= masses[length]
            at_risk -= done + censored
        if survival > 1e-12:
            tail = max(max(counts) + 1, tail_floor)
            masses[tail] = masses.get(tail, 0.0) + survival
        return cls._from_masses(masses)

    @classmethod
    def _from_masses(cls, masses: dict[int, float]) -> OutputLengthModel:
        lengths = tuple(sorted(masses))
        cumulative = list(itertools.accumulate(masses[x] for x in lengths))
        tail = [0.0] * (len(lengths) + 1)
        for i in range(len(lengths) - 1, -1, -1):
            tail[i] = tail[i + 1] + masses[lengths[i]] * lengths[i]
        return cls(lengths, tuple(c / cumulative[-1] for c in cumulative), tuple(t / cumulative[-1] for t in tail))

    def mean(self) -> float:
        return self.tail_tokens[0]

    def _beyond(self, emitted: int) -> tuple[int, float, float]:
        """(first index with length > emitted, P(L <= emitted), P(L > emitted))."""
        i = bisect.bisect_right(self.lengths, emitted)
        below = self.cumulative[i - 1] if i else 0.0
        return i, below, 1.0 - below

    def remaining_quantiles(self, emitted: int, count: int = 8) -> Remaining:
        """`count` equally likely values of L - emitted given L > emitted (mid-quantiles); (1.0,) when
        the sequence has outlived every length in the model."""
        i, below, left = self._beyond(emitted)
        if i == len(self.lengths) or left <= 1e-12:
            return (1.0,)
        picks = (bisect.bisect_left(self.cumulative, below + (j + 0.5) * left / count, i) for j in range(count))
        return tuple(float(self.lengths[min(k, len(self.lengths) - 1)] - emitted) for k in picks)

    def expected_remaining(self, emitted: int) -> float:
        """E[L - emitted | L > emitted]; 1 when the sequence has outlived every length in the model."""
        i, _, left = self._beyond(emitted)
        if i == len(self.lengths) or left <= 1e-12:
            return 1.0
        return self.tail_tokens[i] / left - emitted


ADMISSION_POLICIES: dict[str, Callable[[AdmissionConfig], AdmissionPolicy]] = {
    PredictiveAdmission.name: PredictiveAdmission,
    CurrentLoadAdmission.name: CurrentLoadAdmission,
}


def build_admission_policy(name: str, config: AdmissionConfig) -> AdmissionPolicy:
    """A registered policy by name; raises ValueError for an unknown name."""
    factory = ADMISSION_POLICIES.get(name)
    if factory is None:
        raise ValueError(f"admission policy {name!r} is not one of {', '.join(sorted(ADMISSION_POLICIES))}")
    return factory(config)
