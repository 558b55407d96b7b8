"""A discrete-event, simulated-clock cluster to judge router admission policies without GPUs.

N prefill replicas (FIFO, one prompt at a time, a + b * uncached tokens) and M decode replicas
(continuous batching: every step takes c + d * batch + e * context and gives each running sequence
one token; a prefilled sequence joins at the next step boundary if there is room, else waits). The
first token comes out of prefill; a request's TPOT is (finish - first token) / (output - 1). At each
arrival the policy decides from the states a live router would build from load reports: fitted
models (true service times are jittered around them), queue contents with their predicted prefill
ends, and remaining-token estimates from an `OutputLengthModel` fitted (Kaplan-Meier) to recently
admitted requests' finished lengths and tokens so far; never a request's own output length. Both
policies get the same SLOs and headroom. Rejected requests are dropped (no retries), so every
admitted request runs to completion.

Invariant: every request is either rejected at arrival or prefilled exactly once and decoded to its
output length; a decode batch never exceeds its capacity; the same requests, cluster and policy give
the same report.

    python -m services.router.admission_sim --synthetic
    python -m services.router.admission_sim --trace ../shared/traces/mooncake_conversation.jsonl
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import heapq
import itertools
import math
import random
import statistics
from collections.abc import Sequence

from services.router.admission import (
    SLO,
    AdmissionConfig,
    AdmissionPolicy,
    AdmissionRequest,
    DecodeModel,
    DecodeState,
    IncomingSeq,
    OutputLengthModel,
    PrefillModel,
    PrefillState,
    RunningSeq,
    build_admission_policy,
)


@dataclasses.dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int          # including the first token, which prefill emits (>= 1)
    cached_tokens: int = 0      # prompt tokens served from the prefix cache


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    prefill_model: PrefillModel
    decode_model: DecodeModel
    prefill_replicas: int = 2
    decode_replicas: int = 1
    decode_capacity: int = 256         # most sequences per decode step (batch / KV limit)
    jitter: float = 0.1                # true service time = model time * U(1 - jitter, 1 + jitter)
    seed: int = 0                      # for the jitter
    output_prior_tokens: int = 256     # the router's output-length guess for what it has not seen end yet
    output_history: int = 1000         # the length model's cohort: the last this many admitted requests
    remaining_outcomes: int = 8        # equally likely remaining lengths per sequence in the router's view
    sample_interval_s: float = 1.0     # decode-load sampling period
    warmup_s: float = 60.0             # load samples, gaps and flips before this are not scored
    flip_window_s: float = 10.0        # rejection state per window: rejecting iff > half rejected


@dataclasses.dataclass(frozen=True)
class SimReport:
    policy: str
    arrivals: int
    rejected: int
    rejected_ttft: int                # rejections naming the TTFT SLO (a reject may name both)
    rejected_tpot: int
    completed: int
    ttft_attainment: float            # among admitted
    tpot_attainment: float
    slo_attainment: float             # both SLOs met, among admitted
    goodput_rps: float                # requests meeting both SLOs per second of the run
    goodput_tokens_per_s: float       # their output tokens per second of the run
    load_std: float                   # std of the total decode batch over samples after warm-up
    load_mean: float
    longest_admit_gap_s: float        # longest time without an admission after warm-up (a reject-all phase)
    rejection_flips: int              # rejecting <-> admitting changes between flip windows after warm-up
    load_series: tuple[int, ...]      # total decode batch every sample_interval_s from 0

    def row(self) -> str:
        return (f"| {self.policy} | {self.arrivals} | {self.rejected} | {self.slo_attainment:.3f} "
                f"| {self.ttft_attainment:.3f} | {self.tpot_attainment:.3f} | {self.goodput_rps:.2f} "
                f"| {self.load_mean:.1f} | {self.load_std:.1f} | {self.longest_admit_gap_s:.1f} "
                f"| {self.rejection_flips} |")


TABLE_HEADER = ("| policy | arrivals | rejected | SLO attainment | TTFT ok | TPOT ok | goodput (req/s) "
                "| decode batch mean | decode batch std | longest admit gap (s) | rejection flips |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def simulate(requests: Sequence[SimRequest], cluster: ClusterConfig, policy: AdmissionPolicy, slo: SLO) -> SimReport:
    """Run every request through `policy` and the cluster to completion; scored against `slo`.
    Raises ValueError on a malformed request."""
    for i, r in enumerate(requests):
        if r.output_tokens < 1 or r.prompt_tokens < 1 or not 0 <= r.cached_tokens < r.prompt_tokens:
            raise ValueError(f"request {i}: needs output_tokens >= 1, prompt_tokens >= 1, 0 <= cached < prompt")
    sim = _Cluster(requests, cluster, policy)
    sim.run()
    return sim.report(slo)


_PREFILL_DONE, _DECODE_STEP, _ARRIVAL = 0, 1, 2   # same-time order: completions before arrivals


class _PrefillReplica:
    def __init__(self, model: PrefillModel) -> None:
        self.model = model
        self.queue: collections.deque[int] = collections.deque()
        self.queued_tokens = 0
        self.current: int | None = None
        self.predicted_end = 0.0    # what the replica reports: start + model time (not the jittered truth)

    def state(self) -> PrefillState:
        return PrefillState(self.model, len(self.queue), self.queued_tokens, self.predicted_end)


class _DecodeReplica:
    def __init__(self) -> None:
        self.running: list[tuple[int, int]] = []          # heap of (finish step, request id)
        self.join_step: dict[int, int] = {}
        self.waiting: collections.deque[tuple[int, float]] = collections.deque()   # (id, prefilled at)
        self.steps = 0
        self.context = 0      # prompt + emitted tokens over the running batch
        self.busy = False


class _Cluster:
    """The mutable simulation; only `simulate` drives it."""

    def __init__(self, requests: Sequence[SimRequest], cluster: ClusterConfig, policy: AdmissionPolicy) -> None:
        self.requests, self.cluster, self.policy = requests, cluster, policy
        self.rng = random.Random(cluster.seed)
        self.prefill = [_PrefillReplica(cluster.prefill_model) for _ in range(cluster.prefill_replicas)]
        self.decode = [_DecodeReplica() for _ in range(cluster.decode_replicas)]
        self.events: list[tuple[float, int, int, int]] = []     # (time, kind, tiebreak, arg)
        self.tiebreak = itertools.count()
        for i, r in enumerate(requests):
            self._push(r.arrival_s, _ARRIVAL, i)
        self.assigned = [-1] * len(requests)                     # decode replica per admitted request
        self.first_token = [math.nan] * len(requests)
        self.finish = [math.nan] * len(requests)
        self.rejected: list[tuple[float, tuple[str, ...]]] = []   # (time, SLOs named)
        self.decisions: list[tuple[float, bool]] = []
        self.samples: list[int] = []
        self.cohort: collections.deque[int] = collections.deque(maxlen=cluster.output_history)   # admitted ids
        self.completions = 0
        self.lengths = self._length_model()
        self.remaining_cache: dict[int, tuple[float, ...]] = {}
        self.clock = 0.0

    def _push(self, time: float, kind: int, arg: int) -> None:
        heapq.heappush(self.events, (time, kind, next(self.tiebreak), arg))

    def _jitter(self) -> float:
        j = self.cluster.jitter
        return 1.0 + self.rng.uniform(-j, j) if j > 0 else 1.0

    def run(self) -> None:
        while self.events:
            time, kind, _, arg = heapq.heappop(self.events)
            self._sample_until(time)
            self.clock = time
            if kind == _ARRIVAL:
                self._arrive(arg)
            elif kind == _PREFILL_DONE:
                self._prefill_done(arg)
            else:
                self._decode_step_done(arg)

    def _sample_until(self, time: float) -> None:
        interval = self.cluster.sample_interval_s
        while len(self.samples) * interval <= time:
            self.samples.append(sum(len(d.running) for d in self.decode))

    # arrivals and the policy's view

    def _arrive(self, i: int) -> None:
        r = self.requests[i]
        request = AdmissionRequest(r.prompt_tokens, r.prompt_tokens - r.cached_tokens, self.lengths.mean())
        decision = self.policy.decide(request, [p.state() for p in self.prefill], self._decode_states(), self.clock)
        self.decisions.append((self.clock, decision.admit))
        if not decision.admit:
            self.rejected.append((self.clock, decision.rejected_by))
            return
        self.assigned[i] = decision.decode_index
        self.cohort.append(i)
        replica = self.prefill[decision.prefill_index]
        replica.queue.append(i)
        replica.queued_tokens += request.uncached_tokens
        if replica.current is None:
            self._start_prefill(decision.prefill_index)

    def _decode_states(self) -> list[DecodeState]:
        incoming: list[list[IncomingSeq]] = [[] for _ in self.decode]
        fresh = self._remaining(1)
        for p in self.prefill:   # predicted prefill ends, as the router computes them from the queue order
            end = p.predicted_end
            for i in ([p.current] if p.current is not None else []) + list(p.queue):
                if i != p.current:
                    end = max(end, self.clock) + p.model.seconds(self._uncached(i))
                incoming[self.assigned[i]].append(IncomingSeq(end, fresh, self.requests[i].prompt_tokens))
        states = []
        for d, replica in enumerate(self.decode):
            waiting = [IncomingSeq(at, fresh, self.requests[i].prompt_tokens, prefilled=True)
                       for i, at in replica.waiting]
            running = tuple(self._running_view(replica, i) for _, i in replica.running)
            states.append(DecodeState(self.cluster.decode_model, self.cluster.decode_capacity, running,
                                      tuple(waiting + incoming[d])))
        return states

    def _running_view(self, replica: _DecodeReplica, i: int) -> RunningSeq:
        emitted = 1 + replica.steps - replica.join_step[i]
        return RunningSeq(self._remaining(emitted), self.requests[i].prompt_tokens + emitted)

    def _remaining(self, emitted: int) -> tuple[float, ...]:
        outcomes = self.remaining_cache.get(emitted)
        if outcomes is None:
            outcomes = self.remaining_cache[emitted] = self.lengths.remaining_quantiles(
                emitted, self.cluster.remaining_outcomes)
        return outcomes

    def _uncached(self, i: int) -> int:
        return self.requests[i].prompt_tokens - self.requests[i].cached_tokens

    # prefill

    def _start_prefill(self, p: int) -> None:
        replica = self.prefill[p]
        i = replica.queue.popleft()
        replica.queued_tokens -= self._uncached(i)
        replica.current = i
        model_s = replica.model.seconds(self._uncached(i))
        replica.predicted_end = self.clock + model_s
        self._push(self.clock + model_s * self._jitter(), _PREFILL_DONE, p)

    def _prefill_done(self, p: int) -> None:
        replica = self.prefill[p]
        i, replica.current = replica.current, None
        self.first_token[i] = self.clock
        if self.requests[i].output_tokens == 1:
            self._complete(i)
        else:
            self._join_decode(self.assigned[i], i)
        if replica.queue:
            self._start_prefill(p)

    # decode

    def _join_decode(self, d: int, i: int) -> None:
        replica = self.decode[d]
        replica.waiting.append((i, self.clock))
        if not replica.busy:
            self._admit_waiting(d)
            self._start_step(d)

    def _admit_waiting(self, d: int) -> None:
        replica = self.decode[d]
        while replica.waiting and len(replica.running) < self.cluster.decode_capacity:
            i, _ = replica.waiting.popleft()
            replica.join_step[i] = replica.steps
            heapq.heappush(replica.running, (replica.steps + self.requests[i].output_tokens - 1, i))
            replica.context += self.requests[i].prompt_tokens + 1

    def _start_step(self, d: int) -> None:
        replica = self.decode[d]
        replica.busy = bool(replica.running)
        if replica.busy:
            step_s = self.cluster.decode_model.step_s(len(replica.running), replica.context)
            self._push(self.clock + step_s * self._jitter(), _DECODE_STEP, d)

    def _decode_step_done(self, d: int) -> None:
        replica = self.decode[d]
        replica.steps += 1
        replica.context += len(replica.running)
        while replica.running and replica.running[0][0] <= replica.steps:
            _, i = heapq.heappop(replica.running)
            del replica.join_step[i]
            replica.context -= self.requests[i].prompt_tokens + self.requests[i].output_tokens
            self._complete(i)
        self._admit_waiting(d)
        self._start_step(d)

    def _complete(self, i: int) -> None:
        self.finish[i] = self.clock
        self.completions += 1
        if self.completions % 25 == 0:
            self.lengths = self._length_model()
            self.remaining_cache.clear()

    def _length_model(self) -> OutputLengthModel:
        """What the router can know: the lengths of the recently admitted requests that finished, and
        the tokens so far of those still decoding (Kaplan-Meier); the prior alone before either."""
        completed, running = [], []
        for i in self.cohort:
            decode = self.decode[self.assigned[i]]
            if not math.isnan(self.finish[i]):
                completed.append(self.requests[i].output_tokens)
            elif i in decode.join_step:
                running.append(1 + decode.steps - decode.join_step[i])
        if not completed and not running:
            return OutputLengthModel.from_samples([self.cluster.output_prior_tokens])
        return OutputLengthModel.from_observations(completed, running, tail_floor=self.cluster.output_prior_tokens)

    # scoring

    def report(self, slo: SLO) -> SimReport:
        admitted = [i for i in range(len(self.requests)) if self.assigned[i] >= 0]
        ttft_ok = [self._ttft(i) <= slo.ttft_s or slo.ttft_s == 0 for i in admitted]
        tpot_ok = [self._tpot(i) <= slo.tpot_s or slo.tpot_s == 0 for i in admitted]
        good = [i for i, a, b in zip(admitted, ttft_ok, tpot_ok) if a and b]
        run_s = max([self.clock] + [r.arrival_s for r in self.requests]) or 1.0
        scored = self.samples[int(self.cluster.warmup_s / self.cluster.sample_interval_s):self._last_arrival_sample()]
        share = (lambda flags: sum(flags) / len(flags) if flags else 1.0)  # noqa: E731
        return SimReport(
            policy=self.policy.name, arrivals=len(self.requests), rejected=len(self.rejected),
            rejected_ttft=sum("ttft" in names for _, names in self.rejected),
            rejected_tpot=sum("tpot" in names for _, names in self.rejected),
            completed=sum(1 for i in admitted if not math.isnan(self.finish[i])),
            ttft_attainment=share(ttft_ok), tpot_attainment=share(tpot_ok),
            slo_attainment=len(good) / len(admitted) if admitted else 1.0,
            goodput_rps=len(good) / run_s,
            goodput_tokens_per_s=sum(self.requests[i].output_tokens for i in good) / run_s,
            load_std=statistics.pstdev(scored) if scored else 0.0,
            load_mean=statistics.fmean(scored) if scored else 0.0,
            longest_admit_gap_s=self._longest_admit_gap_s(),
            rejection_flips=self._rejection_flips(),
            load_series=tuple(self.samples),
        )

    def _ttft(self, i: int) -> float:
        return self.first_token[i] - self.requests[i].arrival_s

    def _tpot(self, i: int) -> float:
        tokens = self.requests[i].output_tokens
        return (self.finish[i] - self.first_token[i]) / (tokens - 1) if tokens > 1 else 0.0

    def _last_arrival_sample(self) -> int:
        last = max((r.arrival_s for r in self.requests), default=0.0)
        return int(last / self.cluster.sample_interval_s) + 1

    def _longest_admit_gap_s(self) -> float:
        warm = self.cluster.warmup_s
        admits = [warm] + [t for t, admit in self.decisions if admit and t >= warm] + [self.decisions[-1][0]]
        return max((b - a for a, b in zip(admits, admits[1:])), default=0.0) if self.decisions else 0.0

    def _rejection_flips(self) -> int:
        """Changes of the windowed rejection state after warm-up (a window without arrivals keeps it)."""
        window = self.cluster.flip_window_s
        counts: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
        for time, admit in self.decisions:
            if time >= self.cluster.warmup_s:
                counts[int(time // window)][0 if admit else 1] += 1
        states = [counts[w][1] > counts[w][0] for w in sorted(counts)]
        return sum(1 for a, b in zip(states, states[1:]) if a != b)


# workloads and scenarios


def synthetic_overload(count: int, rate_rps: float, *, seed: int = 0, prompt_median: int = 4096,
                       prompt_sigma: float = 0.8, output_median: int = 256, output_sigma: float = 0.6,
                       max_prompt: int = 32768, max_output: int = 2048) -> list[SimRequest]:
    """`count` requests with Poisson arrivals at `rate_rps` and log-normal prompt / output lengths
    (clipped to [16, max_prompt] and [1, max_output]); deterministic for a seed. No prefix reuse."""
    rng = random.Random(seed)
    clock, requests = 0.0, []
    for _ in range(count):
        clock += rng.expovariate(rate_rps)
        prompt = min(max_prompt, max(16, round(rng.lognormvariate(math.log(prompt_median), prompt_sigma))))
        output = min(max_output, max(1, round(rng.lognormvariate(math.log(output_median), output_sigma))))
        requests.append(SimRequest(clock, prompt, output))
    return requests


def load_mooncake(path: str, *, speedup: float = 1.0, limit: int | None = None,
                  block_tokens: int = 512) -> list[SimRequest]:
    """The Mooncake trace (via tuner.traces.read_trace) with arrivals compressed `speedup` times.
    Cached tokens: the leading hash_ids already seen (a cluster-wide prefix cache, as Mooncake Store),
    times the block size, leaving at least one token to prefill."""
    from tuner.traces import read_trace

    trace = sorted(read_trace(path), key=lambda r: r.arrival_s)[:limit]
    seen: set[int] = set()
    requests = []
    for r in trace:
        hits = next((k for k, block in enumerate(r.prefix_blocks) if block not in seen), len(r.prefix_blocks))
        seen.update(r.prefix_blocks)
        prompt = max(1, r.context_tokens)
        cached = min(prompt - 1, hits * block_tokens)
        requests.append(SimRequest(r.arrival_s / speedup, prompt, max(1, r.generated_tokens), cached))
    return requests


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    requests: tuple[SimRequest, ...]
    cluster: ClusterConfig
    slo: SLO


def synthetic_scenario() -> Scenario:
    """The overload the tests and docs/BENCHMARKS.md use, Mooncake-like (long prompts, a generous
    TTFT SLO, prefill and decode both short of the offered load): 2000 requests at 5 req/s (prompts
    ~5.6K tokens mean, outputs ~310) against 4 prefill replicas (~2.3 req/s) and one decode replica
    (~2.8 req/s at the TPOT limit)."""
    cluster = ClusterConfig(
        prefill_model=PrefillModel(fixed_s=0.02, per_token_s=3e-4),
        decode_model=DecodeModel(fixed_s=0.02, per_seq_s=6e-4, per_context_token_s=2e-8),
        prefill_replicas=4, decode_replicas=1, decode_capacity=256, seed=7)
    return Scenario("synthetic", tuple(synthetic_overload(2000, rate_rps=5.0, seed=7)), cluster,
                    SLO(ttft_s=30.0, tpot_s=0.06))


def trace_scenario(path: str, *, speedup: float = 2.0, limit: int = 2000) -> Scenario:
    """The first `limit` Mooncake conversation requests replayed `speedup` x faster (Mooncake's own
    overload test replays at 2x) against 2 prefill and 1 decode replica."""
    cluster = ClusterConfig(
        prefill_model=PrefillModel(fixed_s=0.05, per_token_s=1e-4),
        decode_model=DecodeModel(fixed_s=0.02, per_seq_s=4e-4, per_context_token_s=2e-8),
        prefill_replicas=2, decode_replicas=1, decode_capacity=256, seed=1)
    return Scenario("mooncake", tuple(load_mooncake(path, speedup=speedup, limit=limit)), cluster,
                    SLO(ttft_s=30.0, tpot_s=0.06))


def compare(scenario: Scenario, names: Sequence[str] = ("current-load", "predictive")) -> list[SimReport]:
    """One report per policy, same requests, cluster and SLOs."""
    config = AdmissionConfig(scenario.slo)
    return [simulate(scenario.requests, scenario.cluster, build_admission_policy(n, config), scenario.slo)
            for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", action="store_true", help="the seeded synthetic overload scenario")
    source.add_argument("--trace", metavar="PATH", help="a Mooncake jsonl trace (e.g. mooncake_conversation.jsonl)")
    parser.add_argument("--speedup", type=float, default=2.0, help="trace time compression (default 2)")
    parser.add_argument("--limit", type=int, default=2000, help="first N trace requests (default 2000)")
    args = parser.parse_args(argv)
    scenario = synthetic_scenario() if args.synthetic else trace_scenario(args.trace, speedup=args.speedup,
                                                                          limit=args.limit)
    print(f"scenario {scenario.name}: {len(scenario.requests)} requests, SLO TTFT {scenario.slo.ttft_s} s, "
          f"TPOT {scenario.slo.tpot_s * 1e3:.0f} ms")
    print(TABLE_HEADER)
    for report in compare(scenario):
        print(report.row())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
