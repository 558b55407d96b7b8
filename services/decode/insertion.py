"""When the decode service prefills short prompts itself: the per-step insertion decision.

Each engine step is either a prefill of some waiting requests (the running decodes pause) or one
decode step for every running request; never both (ALGORITHMS.md §2, online stage).

Invariant: a decision admits at most e = B - n requests, each at most once; with n = 0 and a
non-empty queue it always prefills; with e = 0 or an empty queue it always decodes; and for a fixed
state, making prefill dearer (raising a_p or b_p) never turns a decode decision into a prefill one.
Policies are pure (no I/O, no clock reads) and cost O(|Q| log e) per call.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

QueueOrder = Literal["fcfs", "longest-first", "shortest-first"]
HorizonRule = Literal["min-remaining", "fixed"]


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """Profiled step times in seconds: tau_p(P) = a_p + b_p * sum(s_i), tau_d(n) = a_d + b_d * n."""

    prefill_fixed_s: float       # a_p: one prefill iteration, however small
    prefill_per_token_s: float   # b_p: per prompt token in the iteration
    decode_fixed_s: float        # a_d: one decode step, however few sequences
    decode_per_seq_s: float      # b_d: per running sequence in the step

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) >= 0:
                raise ValueError(f"StepCosts.{field.name} must be >= 0, got {getattr(self, field.name)}")

    def prefill_s(self, prompt_tokens: Sequence[int]) -> float:
        """tau_p of one prefill iteration over prompts of these lengths."""
        return self.prefill_fixed_s + self.prefill_per_token_s * sum(prompt_tokens)

    def decode_s(self, running: int) -> float:
        """tau_d of one decode step over `running` sequences."""
        return self.decode_fixed_s + self.decode_per_seq_s * running

    @classmethod
    def fit(cls, prefill: Sequence[tuple[int, float]], decode: Sequence[tuple[int, float]]) -> StepCosts:
        """Least-squares fit from measured (total prompt tokens, seconds) prefill samples and
        (running sequences, seconds) decode samples. Raises ValueError when a fit is
        underdetermined (fewer than two distinct x) or gives a negative coefficient."""
        a_p, b_p = _fit_line(prefill, "prefill")
        a_d, b_d = _fit_line(decode, "decode")
        return cls(a_p, b_p, a_d, b_d)


def _fit_line(samples: Sequence[tuple[int, float]], what: str) -> tuple[float, float]:
    import numpy as np

    xs = np.asarray([x for x, _ in samples], dtype=np.float64)
    if len(np.unique(xs)) < 2:
        raise ValueError(f"{what} samples need at least two distinct sizes to fit a line, got {len(samples)}")
    ys = np.asarray([y for _, y in samples], dtype=np.float64)
    design = np.stack([np.ones_like(xs), xs], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(design, ys, rcond=None)
    return float(intercept), float(slope)


@dataclasses.dataclass(frozen=True)
class SlotView:
    """One running decode as the policy sees it."""

    decoded_tokens: int                  # decode steps it has taken part in so far
    remaining_tokens: int | None = None  # decode steps still to go, when known (oracle or max_tokens)


@dataclasses.dataclass(frozen=True)
class WaitingView:
    """One waiting request as the policy sees it."""

    prompt_tokens: int
    arrival_s: float
    expected_output_tokens: int | None = None  # when known or predicted


@dataclasses.dataclass(frozen=True)
class QueueState:
    """What one client's scheduler knows at an iteration boundary. `waiting` is in arrival order
    (oldest first): that order is the FCFS order."""

    capacity: int                        # B
    running: tuple[SlotView, ...]        # n = len(running) <= B
    waiting: tuple[WaitingView, ...]     # Q

    @property
    def free_slots(self) -> int:
        """e = B - n."""
        return self.capacity - len(self.running)


@dataclasses.dataclass(frozen=True)
class StepDecision:
    """Indices into QueueState.waiting to prefill this step; empty means run a decode step."""

    prefill: tuple[int, ...] = ()

    @property
    def is_prefill(self) -> bool:
        return bool(self.prefill)


DECODE = StepDecision()


@dataclasses.dataclass(frozen=True)
class InsertionConfig:
    """Knobs of the Lagrangian test `lam * m * H * tau_d(n) >= n * tau_p(P)`. The spec's reconstruction
    is lam=1, H=min remaining, longest output first; the defaults are calibrated on the Azure conversation
    trace and synthetic mixes (see tests/unit/test_insertion_policy.py): lam=1 waits far too long (only
    a_p of tau_p(P) is saved by waiting, the rest is paid later anyway), and longest-first raises mean
    latency by about a quarter, so FCFS order is the default."""

    lam: float = 32.0                        # price of an idle slot-second relative to a stalled one
    horizon: HorizonRule = "min-remaining"   # H = min remaining output over running (spec); or fixed
    horizon_steps: float = 16.0              # H for horizon="fixed"
    expected_output_tokens: float = 256.0    # mean output when none is known: H = this / n
    order: QueueOrder = "fcfs"               # which waiting requests are admitted first

    def __post_init__(self) -> None:
        if not self.lam > 0:
            raise ValueError(f"InsertionConfig.lam must be > 0, got {self.lam}")
        if not (self.horizon_steps > 0 and self.expected_output_tokens > 0):
            raise ValueError("InsertionConfig.horizon_steps and expected_output_tokens must be > 0")
        if self.horizon not in ("min-remaining", "fixed"):
            raise ValueError(f"InsertionConfig.horizon {self.horizon!r} is not one of min-remaining, fixed")
        if self.order not in ("fcfs", "longest-first", "shortest-first"):
            raise ValueError(f"InsertionConfig.order {self.order!r} is not one of fcfs, longest-first, shortest-first")


class InsertionPolicy(Protocol):
    name: str

    def decide(self, state: QueueState) -> StepDecision:
        """The next iteration for this client. Pure: reads only `state` and the policy's frozen
        config, mutates nothing; returns at most state.free_slots distinct waiting indices."""
        ...


def admission_order(waiting: Sequence[WaitingView], count: int, order: QueueOrder) -> tuple[int, ...]:
    """The first `count` waiting indices in `order`; ties and unknown output lengths keep arrival
    order (unknown lengths go after known ones)."""
    count = min(count, len(waiting))
    if order == "fcfs":
        return tuple(range(count))
    if order == "longest-first":
        key: Callable[[int], tuple[float, int]] = lambda i: (-_known_or(waiting[i], -1.0), i)  # noqa: E731
    else:
        key = lambda i: (_known_or(waiting[i], float("inf")), i)  # noqa: E731
    return tuple(heapq.nsmallest(count, range(len(waiting)), key=key))


def _known_or(request: WaitingView, default: float) -> float:
    known = request.expected_output_tokens
    return float(known) if known is not None else default


class FcfsInsertion:
    """vLLM-style baseline: prefill whenever a slot is free and someone waits, oldest first."""

    name = "fcfs"

    def __init__(self, costs: StepCosts | None = None, config: InsertionConfig | None = None) -> None:
        self.costs, self.config = costs, config or InsertionConfig()

    def decide(self, state: QueueState) -> StepDecision:
        if state.free_slots <= 0 or not state.waiting:
            return DECODE
        return StepDecision(admission_order(state.waiting, state.free_slots, "fcfs"))


class LagrangianInsertion:
    """Prefill the first m = min(e, |Q|) queued requests iff lam * m * H * tau_d(n) >= n * tau_p(P):
    the idle-slot cost of waiting H more decode steps outweighs stalling the n running decodes."""

    name = "lagrangian"

    def __init__(self, costs: StepCosts, config: InsertionConfig | None = None) -> None:
        self.costs, self.config = costs, config or InsertionConfig()

    def decide(self, state: QueueState) -> StepDecision:
        if state.free_slots <= 0 or not state.waiting:
            return DECODE
        chosen = admission_order(state.waiting, state.free_slots, self.config.order)
        n = len(state.running)
        if n == 0:
            return StepDecision(chosen)
        stall = n * self.costs.prefill_s([state.waiting[i].prompt_tokens for i in chosen])
        idle = self.config.lam * len(chosen) * self.horizon(state.running) * self.costs.decode_s(n)
        return StepDecision(chosen) if idle >= stall else DECODE

    def horizon(self, running: Sequence[SlotView]) -> float:
        """H: decode steps until the next natural prefill opportunity (a slot freeing up). Without
        known remaining outputs, the expected first departure of n requests of mean output E: E / n."""
        if self.config.horizon == "fixed":
            return self.config.horizon_steps
        known = [slot.remaining_tokens for slot in running if slot.remaining_tokens is not None]
        if known:
            return float(min(known))
        return max(1.0, self.config.expected_output_tokens / len(running))


INSERTION_POLICIES: dict[str, Callable[[StepCosts, InsertionConfig], InsertionPolicy]] = {
    FcfsInsertion.name: FcfsInsertion,
    LagrangianInsertion.name: LagrangianInsertion,
}


def build_insertion_policy(name: str, costs: StepCosts, config: InsertionConfig | None = None) -> InsertionPolicy:
    """A registered policy by name; raises ValueError for an unknown name."""
    factory = INSERTION_POLICIES.get(name)
    if factory is None:
        raise ValueError(f"insertion policy {name!r} is not one of {', '.join(sorted(INSERTION_POLICIES))}")
    return factory(costs, config or InsertionConfig())
