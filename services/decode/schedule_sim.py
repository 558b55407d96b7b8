"""A deterministic simulated-clock decode client, to judge insertion policies without a GPU.

One client of capacity B runs iterations back to back on a simulated clock: each is either a
prefill of the set the policy admits (tau_p, running decodes paused) or one decode step for every
running request (tau_d(n)); when nothing runs and nothing waits the clock jumps to the next arrival.
A request's first token is the end of its first decode step (the spec's timing model: prefill
iterations emit no tokens).

Invariant: at every iteration n <= B; an iteration prefills or decodes, never both; every request
is prefilled exactly once, then takes part in exactly o_i consecutive decode steps and leaves; the
same requests, costs and policy give the same schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from services.decode.insertion import InsertionPolicy, QueueState, SlotView, StepCosts, StepDecision, WaitingView


@dataclasses.dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int   # o_i: decode steps it takes part in (>= 1)


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One iteration: a prefill (admitted non-empty, decoding 0) or a decode step."""

    start_s: float
    duration_s: float
    decoding: int                 # n_k: requests producing a token in this iteration
    admitted: tuple[int, ...]     # request ids prefilled in this iteration
    occupied_after: int           # slots in use when the iteration ends


@dataclasses.dataclass(frozen=True)
class SimResult:
    capacity: int
    ttft_s: tuple[float, ...]       # per request, from its arrival
    latency_s: tuple[float, ...]    # end-to-end, from its arrival to its last token
    steps: tuple[StepRecord, ...]
    makespan_s: float               # last completion, on the requests' clock

    @property
    def utilisation(self) -> float:
        """U = sum_k n_k t_k / (B sum_k t_k) over iterations (idle gaps excluded; prefill n_k = 0)."""
        busy = sum(step.duration_s for step in self.steps)
        slot_time = sum(step.decoding * step.duration_s for step in self.steps)
        return slot_time / (self.capacity * busy) if busy > 0 else 0.0

    @property
    def mean_latency_s(self) -> float:
        return sum(self.latency_s) / len(self.latency_s)

    @property
    def mean_ttft_s(self) -> float:
        return sum(self.ttft_s) / len(self.ttft_s)


def simulate(requests: Sequence[SimRequest], costs: StepCosts, policy: InsertionPolicy, capacity: int,
             *, reveal_outputs: bool = True) -> SimResult:
    """Run `requests` to completion on one client. `reveal_outputs` shows the policy each request's
    o_i (an oracle, as the spec's offline stage assumes); otherwise it sees only prompt lengths.
    Raises ValueError on a malformed request or a decision that breaks the policy contract."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    for i, request in enumerate(requests):
        if request.output_tokens < 1 or request.prompt_tokens < 0 or request.arrival_s < 0:
            raise ValueError(f"request {i}: needs output_tokens >= 1, prompt_tokens >= 0, arrival_s >= 0")
    client = _Client(requests, costs, capacity, reveal_outputs)
    while not client.done():
        client.admit_arrivals()
        if client.idle():
            client.skip_to_next_arrival()
            continue
        client.run(policy.decide(client.view()))
    return client.result()


class _Client:
    """The mutable state of one simulated client; only `simulate` drives it."""

    def __init__(self, requests: Sequence[SimRequest], costs: StepCosts, capacity: int, reveal: bool) -> None:
        self.requests, self.costs, self.capacity, self.reveal = requests, costs, capacity, reveal
        self.pending = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i))
        self.next_pending = 0
        self.clock = 0.0
        self.waiting: list[int] = []           # request ids, arrival order
        self.running: list[int] = []           # request ids, admission order
        self.decoded = [0] * len(requests)
        self.first_token = [0.0] * len(requests)
        self.finish = [0.0] * len(requests)
        self.steps: list[StepRecord] = []
        self._waiting_view: tuple[WaitingView, ...] | None = None

    def done(self) -> bool:
        return self.next_pending == len(self.pending) and not self.waiting and not self.running

    def idle(self) -> bool:
        return not self.waiting and not self.running

    def admit_arrivals(self) -> None:
        while self.next_pending < len(self.pending):
            request_id = self.pending[self.next_pending]
            if self.requests[request_id].arrival_s > self.clock:
                break
            self.waiting.append(request_id)
            self.next_pending += 1
            self._waiting_view = None

    def skip_to_next_arrival(self) -> None:
        self.clock = max(self.clock, self.requests[self.pending[self.next_pending]].arrival_s)

    def view(self) -> QueueState:
        if self._waiting_view is None:
            self._waiting_view = tuple(self._waiting(i) for i in self.waiting)
        running = tuple(SlotView(self.decoded[i], self._remaining(i)) for i in self.running)
        return QueueState(self.capacity, running, self._waiting_view)

    def _waiting(self, request_id: int) -> WaitingView:
        request = self.requests[request_id]
        expected = request.output_tokens if self.reveal else None
        return WaitingView(request.prompt_tokens, request.arrival_s, expected)

    def _remaining(self, request_id: int) -> int | None:
        return self.requests[request_id].output_tokens - self.decoded[request_id] if self.reveal else None

    def run(self, decision: StepDecision) -> None:
        if decision.is_prefill:
            self._prefill(decision.prefill)
        elif self.running:
            self._decode()
        else:
            raise ValueError("policy chose a decode step with nothing running and a non-empty queue")

    def _prefill(self, picks: tuple[int, ...]) -> None:
        free = self.capacity - len(self.running)
        if len(set(picks)) != len(picks) or len(picks) > free or not all(0 <= p < len(self.waiting) for p in picks):
            raise ValueError(f"policy admitted {picks} with {free} free slots and {len(self.waiting)} waiting")
        admitted = tuple(self.waiting[p] for p in picks)
        duration = self.costs.prefill_s([self.requests[i].prompt_tokens for i in admitted])
        picked = set(picks)
        self.waiting = [r for p, r in enumerate(self.waiting) if p not in picked]
        self._waiting_view = None
        self.running.extend(admitted)
        self._record(duration, 0, admitted)

    def _decode(self) -> None:
        duration = self.costs.decode_s(len(self.running))
        end = self.clock + duration
        for request_id in self.running:
            self.decoded[request_id] += 1
            if self.decoded[request_id] == 1:
                self.first_token[request_id] = end
        finished = [i for i in self.running if self.decoded[i] == self.requests[i].output_tokens]
        for request_id in finished:
            self.finish[request_id] = end
        n = len(self.running)
        self.running = [i for i in self.running if self.decoded[i] < self.requests[i].output_tokens]
        self._record(duration, n, ())

    def _record(self, duration: float, decoding: int, admitted: tuple[int, ...]) -> None:
        self.steps.append(StepRecord(self.clock, duration, decoding, admitted, len(self.running)))
        self.clock += duration

    def result(self) -> SimResult:
        arrivals = [r.arrival_s for r in self.requests]
        return SimResult(
            capacity=self.capacity,
            ttft_s=tuple(t - a for t, a in zip(self.first_token, arrivals)),
            latency_s=tuple(t - a for t, a in zip(self.finish, arrivals)),
            steps=tuple(self.steps),
            makespan_s=max(self.finish, default=0.0),
        )


def work_s(request: SimRequest, costs: StepCosts, capacity: int) -> float:
    """The spec's per-request work estimate w_i = tau_p(s_i) + o_i * tau_d(B) / B (seconds)."""
    return costs.prefill_s([request.prompt_tokens]) + request.output_tokens * costs.decode_s(capacity) / capacity


def scale_to_load(requests: Sequence[SimRequest], costs: StepCosts, capacity: int, load: float) -> list[SimRequest]:
    """The same requests with arrival times rescaled (shape kept) so that the offered rate is `load`
    times the client's capacity 1 / mean(w_i); arrivals are shifted to start at 0."""
    if len(requests) < 2 or not load > 0:
        raise ValueError("scale_to_load needs at least two requests and load > 0")
    first = min(r.arrival_s for r in requests)
    span = max(r.arrival_s for r in requests) - first
    if span <= 0:
        raise ValueError("scale_to_load needs requests that arrive at different times")
    capacity_rps = len(requests) / sum(work_s(r, costs, capacity) for r in requests)
    factor = (len(requests) - 1) / (load * capacity_rps * span)
    return [dataclasses.replace(r, arrival_s=(r.arrival_s - first) * factor) for r in requests]
