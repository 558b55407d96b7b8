"""Local prefill in the decode engine (the router's E -> PD path for short prompts) and the online
insertion decision: each step, prefill waiting prompts (pausing the running decodes) or decode.

Invariant: a prompt job is prefilled exactly once, by the same `PromptPrefiller` the prefill
service runs (so its tokens equal the E -> P -> D path's), only in a step chosen by the insertion
policy, and never in the same step as a decode; the policy's step costs are refitted from this
engine's own measured step times once it has enough samples of two sizes.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import torch

from epdserve.engine.sampler import SamplingParams
from services.decode.insertion import (
    InsertionPolicy,
    QueueState,
    SlotView,
    StepCosts,
    WaitingView,
    build_insertion_policy,
)
from services.prefill.prefill import PrefillResult, PromptPrefiller

# A starting cost model until this engine has measured its own steps (H100-class 8B shapes).
DEFAULT_COSTS = StepCosts(prefill_fixed_s=0.015, prefill_per_token_s=0.00008, decode_fixed_s=0.020,
                          decode_per_seq_s=0.0002)
SAMPLE_WINDOW = 256
REFIT_EVERY = 32


@dataclasses.dataclass
class PromptJob:
    """A prompt to prefill here. `embeddings` may be views into the cache until the engine reports
    the job in `StepResult.inputs_done`; `max_new_tokens` counts the prefill's first token."""

    request_id: str
    token_ids: list[int]
    embeddings: list[torch.Tensor]
    max_new_tokens: int
    sampling: SamplingParams
    stop_token_ids: frozenset[int] = frozenset()
    arrival_s: float = dataclasses.field(default_factory=time.monotonic)


class StepTimes:
    """Rolling measured step times; `costs()` is the least-squares fit (or the starting model)."""

    def __init__(self, initial: StepCosts) -> None:
        self.initial = self.fitted = initial
        self.decode: collections.deque[tuple[int, float]] = collections.deque(maxlen=SAMPLE_WINDOW)
        self.prefill: collections.deque[tuple[int, float]] = collections.deque(maxlen=SAMPLE_WINDOW)
        self._since_fit = 0

    def record(self, kind: str, size: int, seconds: float) -> None:
        (self.decode if kind == "decode" else self.prefill).append((size, seconds))
        self._since_fit += 1

    def costs(self) -> StepCosts:
        if self._since_fit >= REFIT_EVERY and _two_sizes(self.decode) and _two_sizes(self.prefill):
            self._since_fit = 0
            try:
                self.fitted = StepCosts.fit(list(self.prefill), list(self.decode))
            except ValueError:  # a fit with a negative term: keep the last good model
                pass
        return self.fitted


def _two_sizes(samples) -> bool:
    return len({size for size, _ in samples}) >= 2


class LocalPrefill:
    """The prompt queue, the insertion policy and the prefiller of one decode engine."""

    def __init__(self, prefiller: PromptPrefiller, policy: str, capacity: int,
                 initial_costs: StepCosts = DEFAULT_COSTS) -> None:
        self.prefiller, self.policy_name, self.capacity = prefiller, policy, capacity
        self.times = StepTimes(initial_costs)
        self.queue: collections.deque[PromptJob] = collections.deque()
        self._policy: InsertionPolicy = build_insertion_policy(policy, initial_costs)
        self._policy_costs = initial_costs

    def choose(self, running: list[SlotView]) -> list[PromptJob]:
        """Pop and return the prompts to prefill this step (empty: run a decode step)."""
        if not self.queue:
            return []
        state = QueueState(self.capacity, tuple(running), tuple(
            WaitingView(len(job.token_ids), job.arrival_s, job.max_new_tokens) for job in self.queue))
        chosen = set(self.policy().decide(state).prefill)
        picked = [job for i, job in enumerate(self.queue) if i in chosen]
        self.queue = collections.deque(job for i, job in enumerate(self.queue) if i not in chosen)
        return picked

    def policy(self) -> InsertionPolicy:
        costs = self.times.costs()
        if costs is not self._policy_costs:
            self._policy, self._policy_costs = build_insertion_policy(self.policy_name, costs), costs
        return self._policy

    def prefill(self, jobs: list[PromptJob]) -> list[PrefillResult]:
        """Run the chosen prompts (one prefill step) and record its time."""
        start = time.perf_counter()
        results = [self.prefiller.run(job.token_ids, job.embeddings, job.sampling) for job in jobs]
        self.times.record("prefill", sum(len(job.token_ids) for job in jobs), time.perf_counter() - start)
        return results

    def drop(self, request_ids: set[str]) -> list[PromptJob]:
        dropped = [job for job in self.queue if job.request_id in request_ids]
        self.queue = collections.deque(job for job in self.queue if job.request_id not in request_ids)
        return dropped
