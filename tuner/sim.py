"""Discrete-event simulation of an E -> P -> D deployment on a workload trace.

Mirrors what the services do: the router's overhead, then one request's images spread over encode
replicas (least outstanding first), each replica batching images across requests (a batch starts
when full or when its oldest image has waited max_wait, one batch at a time), an embedding cache
keyed by image hash; prefill replicas one request at a time, chosen by predicted finish, with a
prefix cache over the trace's block hashes; then the KV hand-off and a decode replica (fewest
sequences first) that steps every running sequence together (continuous batching: joins at the
next step, admission bounded by max_running and KV rows reserved for prompt + output). With
`local_prefill_tokens`, a prompt that short takes E -> PD when that is predicted to give its first
token sooner, as the router decides: the decode replica prefills it between two steps (its running
sequences wait) and it joins the batch with no KV hand-off. Simplified: the prefill goes first at
the next step (the service's insertion policy may defer it, and waits for a free slot). Service
times come from the profile's fits times a draw from each fit's residuals. With a shared-host
profile (`host_cores` > 0) every busy replica and every request's overheads (RPCs, image decoding,
the router's work) share those cores (processor sharing), as the processes of a local deployment do,
less what each of the candidate's processes uses while idle (`idle_cores_per_process`: polling,
heartbeats), which more replicas take from the busy ones.

E+P colocated (`encode_colocated`: prefill --with-encode, router --encode-colocated): no encode
replicas; each prefill replica owns an encode batcher (the same batching rules) whose tower batches
and the replica's prefills run one at a time, FIFO, on its one model thread. The router places an
image request on the prefill replica whose thread is predicted to finish soonest (the work queued
there, encode included, plus this request's images and prompt), encodes all its images there and
prefills there (or takes E -> PD, judged against that replica); a text-only prompt's choice also
counts the encode work queued on each replica. Encode busy time is then accounted against the
prefill replicas (`SimResult.hosted_on`).

Invariant: every request that arrives either completes (TTFT, TPOT and e2e recorded) or is
counted as rejected (prompt + output beyond the context or the KV capacity); with encode colocated,
all of a request's images are encoded on the prefill replica that prefills it (unless it takes
E -> PD); simulated time only moves forward, and the same trace, candidate, profile and seed give
identical results.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from tuner.des import Clock, Cpu, Job, Lru, Noise
from tuner.profile import Fit, Profile
from tuner.traces import TraceRequest

TRACE_BLOCK_TOKENS = 512  # Mooncake hash_ids: one id per 512 prompt tokens


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One deployment the tuner can recommend: replicas per stage and per-stage settings."""
    encode_replicas: int = 1
    prefill_replicas: int = 1
    decode_replicas: int = 1
    encode_max_batch: int = 32          # encode --max-batch-size
    encode_max_wait_ms: float = 5.0     # encode --max-batch-wait-ms
    decode_max_running: int = 64        # decode --max-running
    image_keep_ratio: float = 1.0       # router --image-keep-ratio (Dynamic-LLaVA; 1 = lossless)
    fastkv: bool = False                # prefill --fastkv at the profiled rates (lossy; no prefix-cache reuse)
    prefix_cache: bool = True           # prefill --prefix-cache
    encoder_cache_images: int = 100_000  # embeddings the mmcache keeps (LRU)
    prefix_cache_blocks: int = 100_000   # trace blocks the prefix cache keeps (LRU)
    local_prefill_tokens: int = 0       # router --local-prefill-tokens: E -> PD for prompts this short (0 = never)
    encode_colocated: bool = False      # E+P colocated: each prefill replica also encodes (prefill --with-encode,
                                        # router --encode-colocated) on its one model thread; encode_replicas is 0

    def __post_init__(self) -> None:
        if self.encode_colocated and self.encode_replicas:
            raise ValueError(f"encode_replicas must be 0 when encode is colocated with prefill "
                             f"(got {self.encode_replicas})")

    def gpus(self, per_replica: Sequence[int] = (1, 1, 1)) -> int:
        e, p, d = per_replica
        return self.encode_replicas * e + self.prefill_replicas * p + self.decode_replicas * d

    def processes(self) -> int:
        """Service processes of a deployment of this candidate: every replica and the router."""
        return self.encode_replicas + self.prefill_replicas + self.decode_replicas + 1

    def label(self) -> str:
        encode = "E+" if self.encode_colocated else f"E{self.encode_replicas}"
        return f"{encode}P{self.prefill_replicas}D{self.decode_replicas}"


@dataclasses.dataclass
class RequestOutcome:
    arrival_s: float
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    tpot_s: float = math.nan
    rejected: str = ""


@dataclasses.dataclass
class SimResult:
    outcomes: list[RequestOutcome]
    busy_s: dict[str, float]       # stage -> busy seconds summed over its replicas
    replicas: dict[str, int]
    makespan_s: float
    hosted_on: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> the stage whose replicas
                                                                         # run it (colocated: encode -> prefill)

    def values(self, metric: str) -> np.ndarray:
        data = np.array([getattr(o, f"{metric}_s") for o in self.outcomes if not o.rejected], dtype=float)
        return data[~np.isnan(data)]

    def percentile(self, metric: str, q: float) -> float:
        data = self.values(metric)
        return float(np.percentile(data, q)) if len(data) else math.inf

    def mean(self, metric: str) -> float:
        data = self.values(metric)
        return float(data.mean()) if len(data) else math.inf

    @property
    def rejected(self) -> int:
        return sum(1 for o in self.outcomes if o.rejected)

    def utilization(self) -> dict[str, float]:
        """Busy share of each stage's replicas over the makespan. A hosted stage (colocated encode) has
        no replicas of its own: its figure is its share of the host's replicas, and the host's figure
        counts the hosted work too (those replicas' whole load, what saturates them)."""
        if self.makespan_s <= 0:
            return {stage: 0.0 for stage in self.busy_s}
        load = dict(self.busy_s)
        for guest, host in self.hosted_on.items():
            load[host] += self.busy_s[guest]
        return {stage: (self.busy_s[stage] if stage in self.hosted_on else load[stage])
                / (self.replicas[self.hosted_on.get(stage, stage)] * self.makespan_s) for stage in self.busy_s}

    def bottleneck(self) -> str:
        """The replicas busiest over the run (a hosted stage is part of its host's load, never named)."""
        used = self.utilization()
        return max((stage for stage in used if stage not in self.hosted_on), key=used.get)


@dataclasses.dataclass
class _Req:
    index: int
    trace: TraceRequest
    prompt_tokens: int
    pending_shards: int = 0
    first_token_s: float = 0.0
    replica: _PrefillReplica | None = None   # colocated: the prefill replica that encodes and prefills it


def batched_tower_ms(fit: Fit, images: int, megapixels: float, max_batch: int) -> float:
    """Tower time of `images` encoded in full batches of `max_batch` (the fit's fixed part once a batch)."""
    batches = math.ceil(images / max(1, max_batch))
    fixed = fit.predict(images=0, megapixels=0)
    return batches * fixed + fit.predict(images=images, megapixels=megapixels) - fixed


class _EncodeReplica:
    """An encode batcher: a batch starts when full or when its oldest image has waited max_wait, one
    batch at a time. It runs on its own device, or, with a `host` (colocated), queues on that prefill
    replica's model thread behind whatever is queued there (and the host accounts its busy time)."""

    def __init__(self, sim: Simulation, host: _PrefillReplica | None = None) -> None:
        self.sim, self.host, self.queue, self.running, self.outstanding = sim, host, collections.deque(), False, 0
        self.queued_megapixels = 0.0   # of the images waiting for a batch
        self._timer = 0  # version of the pending "start a batch" timer

    def queued_work_ms(self, images: int = 0, megapixels: float = 0.0) -> float:
        """Predicted tower time of the images waiting here for a batch, and of `images` more."""
        count = len(self.queue) + images
        if not count:
            return 0.0
        return batched_tower_ms(self.sim.profile.encode.tower_ms, count, self.queued_megapixels + megapixels,
                                self.sim.candidate.encode_max_batch)

    def submit(self, job: tuple) -> None:   # job: (queued_s, megapixels, done callback)
        self.queue.append(job)
        self.queued_megapixels += job[1]
        self.outstanding += 1
        if not self.running:
            self._arm()

    def _arm(self) -> None:
        candidate = self.sim.candidate
        self._timer += 1
        if len(self.queue) >= candidate.encode_max_batch:
            self._start()
            return
        version = self._timer
        start = self.queue[0][0] + candidate.encode_max_wait_ms / 1000.0
        self.sim.clock.at(start, lambda: self._start() if version == self._timer and not self.running else None)

    def _start(self) -> None:
        self._timer += 1
        size = self.sim.candidate.encode_max_batch
        batch = [self.queue.popleft() for _ in range(min(size, len(self.queue)))]
        self.running = True
        megapixels = sum(j[1] for j in batch)
        self.queued_megapixels = self.queued_megapixels - megapixels if self.queue else 0.0
        fit = self.sim.profile.encode.tower_ms
        ms = self.sim.noise.draw(fit, fit.predict(images=len(batch), megapixels=megapixels))
        finished = functools.partial(self._finish, batch)
        if self.host is None:
            self.sim.busy["encode"] += ms / 1000.0
            self.sim.cpu.run(ms, finished)
        else:
            self.host.submit(ms, finished, kind="encode")

    def _finish(self, batch: list) -> None:
        self.running = False
        self.outstanding -= len(batch)
        for job in batch:
            job[2]()
        if self.queue:
            self._arm()


class _PrefillReplica:
    """One model thread running its jobs one at a time in submission order: prefills and, colocated,
    the tower batches of the encode batcher it hosts (`encoder`)."""

    def __init__(self, sim: Simulation, *, colocated: bool = False) -> None:
        self.sim, self.queue, self.busy_until_s, self.running = sim, collections.deque(), 0.0, False
        self.encoder = _EncodeReplica(sim, host=self) if colocated else None

    def predicted_finish(self, ms: float, images: int = 0, megapixels: float = 0.0) -> float:
        """When `ms` of work placed here now would be done, as the router predicts it: after the jobs
        queued on the thread and, colocated, the images waiting in its batcher plus `images` more."""
        start = max(self.busy_until_s, self.sim.clock.now)
        if self.encoder is not None:
            start += self.encoder.queued_work_ms(images, megapixels) / 1000.0
        return start + ms / 1000.0

    def submit(self, ms: float, done: Callable[[], None], kind: str = "prefill") -> None:
        """Queue `ms` of `kind` work (busy time of that stage) behind everything queued here."""
        self.busy_until_s = max(self.busy_until_s, self.sim.clock.now) + ms / 1000.0
        self.queue.append((kind, ms, done))
        if not self.running:
            self._next()

    def _next(self) -> None:
        if not self.queue:
            self.running = False
            return
        self.running = True
        kind, ms, done = self.queue.popleft()
        self.sim.busy[kind] += ms / 1000.0

        def finished() -> None:
            done()
            self._next()
        self.sim.cpu.run(ms, finished)


@dataclasses.dataclass
class _Seq:
    req: _Req
    remaining: int
    context: int
    reserved: int


class _DecodeReplica:
    """Continuous batching. Between changes of the batch (a sequence finishing, one joining) every
    step costs a + b*batch + c*context with context growing by `batch` rows a step, so a run of k
    steps is planned as one segment (closed-form duration); an arrival cuts the segment at the end
    of the step in progress, where the newcomer joins."""

    def __init__(self, sim: Simulation) -> None:
        self.sim, self.waiting, self.running = sim, collections.deque(), []
        self.stepping, self.reserved = False, 0
        self.local_prefills: collections.deque = collections.deque()   # (ms, done) of E -> PD prompts
        self.prefilling = False
        self._prefill_job: Job | None = None
        self._segment = (0.0, 0, 0.0, 0.0)   # (start, steps, first step ms, ms added per step)
        self._version = 0
        self._job: Job | None = None

    @property
    def load(self) -> int:
        return len(self.running) + len(self.waiting) + len(self.local_prefills) + self.prefilling

    def local_prefill_wait_s(self) -> float:
        """Predicted wait before a new local prefill starts: the step or local prefill in progress,
        then the local prefills queued here."""
        if self.prefilling:
            in_progress_ms = self._prefill_ms - self.sim.cpu.progress_ms(self._prefill_job)
        else:
            in_progress_ms = self._segment[2] if self.stepping else 0.0
        return (max(0.0, in_progress_ms) + sum(ms for ms, _ in self.local_prefills)) / 1000.0

    def submit(self, seq: _Seq) -> None:
        self.waiting.append(seq)
        self._wake()

    def submit_local_prefill(self, ms: float, done: Callable[[], None]) -> None:
        """Prefill a prompt here between two steps; `done` runs when its first token is out."""
        self.local_prefills.append((ms, done))
        self._wake()

    def _wake(self) -> None:
        if self.prefilling:
            return                  # the plan after the prefill admits it
        if not self.stepping:
            self._plan()
        else:
            self._cut()

    def _run_local_prefill(self) -> None:
        ms, done = self.local_prefills.popleft()
        self.prefilling = self.stepping = True
        self.sim.busy["decode"] += ms / 1000.0

        def finished() -> None:
            self.prefilling = self.stepping = False
            done()
            if not self.stepping:
                self._plan()
        self._prefill_ms, self._prefill_job = ms, self.sim.cpu.run(ms, finished)

    def _admit(self) -> None:
        candidate, capacity = self.sim.candidate, self.sim.profile.decode.kv_capacity_tokens
        while self.waiting and len(self.running) < candidate.decode_max_running:
            if self.reserved + self.waiting[0].reserved > capacity:
                break
            seq = self.waiting.popleft()
            self.reserved += seq.reserved
            self.running.append(seq)

    def _plan(self) -> None:
        if self.local_prefills:
            self._run_local_prefill()
            return
        self._admit()
        if not self.running:
            self.stepping = False
            return
        self.stepping = True
        fit, batch = self.sim.profile.decode.step_ms, len(self.running)
        first_ms = fit.predict(batch=batch, context=sum(s.context for s in self.running))
        growth_ms = fit.predict(batch=0, context=batch) - fit.predict(batch=0, context=0)
        steps = min(s.remaining for s in self.running)
        self._segment = (self.sim.clock.now, steps, first_ms, growth_ms)
        self._version += 1
        version = self._version
        self._job = self.sim.cpu.run(_segment_ms(steps, first_ms, growth_ms), lambda: self._stepped(version))

    def _cut(self) -> None:
        """Shorten the running segment to end with the step in progress."""
        start, steps, first_ms, growth_ms = self._segment
        done = _steps_within(self.sim.cpu.progress_ms(self._job), first_ms, growth_ms)
        if done + 1 >= steps:
            return
        self._segment = (start, done + 1, first_ms, growth_ms)
        self.sim.cpu.shorten(self._job, _segment_ms(done + 1, first_ms, growth_ms))

    def _stepped(self, version: int) -> None:
        if version != self._version:
            return
        start, steps, first_ms, growth_ms = self._segment
        self.sim.busy["decode"] += _segment_ms(steps, first_ms, growth_ms) / 1000.0
        now, still = self.sim.clock.now, []
        for seq in self.running:
            seq.remaining -= steps
            seq.context += steps
            if seq.remaining > 0:
                still.append(seq)
            else:
                self.reserved -= seq.reserved
                self.sim.finish(seq.req, now)
        self.running = still
        self._plan()


def _decoding(req: _Req, kv_rows: int) -> _Seq:
    """The sequence a decode replica runs after the first token: KV rows reserved for the rest."""
    return _Seq(req, req.trace.generated_tokens - 1, kv_rows, kv_rows + req.trace.generated_tokens)


def _segment_ms(steps: int, first_ms: float, growth_ms: float) -> float:
    return steps * first_ms + growth_ms * steps * (steps - 1) / 2.0


def _steps_within(elapsed_ms: float, first_ms: float, growth_ms: float) -> int:
    """Whole steps of a segment finished `elapsed_ms` after it started."""
    if growth_ms <= 0:
        return int(elapsed_ms // first_ms) if first_ms > 0 else 0
    half = first_ms - growth_ms / 2.0
    steps = int((-half + math.sqrt(half * half + 2.0 * growth_ms * elapsed_ms)) / growth_ms)
    while steps > 0 and _segment_ms(steps, first_ms, growth_ms) > elapsed_ms:
        steps -= 1
    return steps


class Simulation:
    def __init__(self, profile: Profile, candidate: Candidate, *, seed: int = 0) -> None:
        self.profile, self.candidate = profile, candidate
        self.clock = Clock()
        self.cpu = Cpu(self.clock, profile.cores_for_work(candidate.processes()))
        self.noise = Noise(seed)
        self.busy = {"encode": 0.0, "prefill": 0.0, "decode": 0.0}
        self.encoders = [_EncodeReplica(self) for _ in range(candidate.encode_replicas)]
        self.prefills = [_PrefillReplica(self, colocated=candidate.encode_colocated)
                         for _ in range(candidate.prefill_replicas)]
        self.decoders = [_DecodeReplica(self) for _ in range(candidate.decode_replicas)]
        self.embeddings = Lru(candidate.encoder_cache_images)
        self.prefixes = Lru(candidate.prefix_cache_blocks)
        self.outcomes: list[RequestOutcome] = []

    def run(self, requests: Sequence[TraceRequest]) -> SimResult:
        image_tokens = self.profile.image_tokens(self.candidate.image_keep_ratio)
        for i, trace in enumerate(sorted(requests, key=lambda r: r.arrival_s)):
            self.outcomes.append(RequestOutcome(trace.arrival_s))
            req = _Req(i, trace, trace.context_tokens + trace.num_images * image_tokens)
            self.clock.at(trace.arrival_s, functools.partial(self._arrive, req))
        self.clock.run()
        last = max((o.arrival_s + o.e2e_s for o in self.outcomes if not math.isnan(o.e2e_s)), default=0.0)
        first = min((o.arrival_s for o in self.outcomes), default=0.0)
        return SimResult(self.outcomes, self.busy, {"encode": len(self.encoders), "prefill": len(self.prefills),
                                                    "decode": len(self.decoders)}, last - first,
                         {"encode": "prefill"} if self.candidate.encode_colocated else {})

    def _overhead(self, ms: float, then: Callable[[], None]) -> None:
        """Time a request spends outside any replica's queue (RPCs, image decoding, cache calls, the
        router's own work). On a shared host it is CPU work competing with everything else there."""
        if self.cpu.cores > 0:
            self.cpu.run(ms, then)
        else:
            self.clock.after(ms / 1000.0, then)

    def _arrive(self, req: _Req) -> None:
        trace = req.trace
        if req.prompt_tokens + trace.generated_tokens > self.profile.max_context:
            self.outcomes[req.index].rejected = "context"
            return
        if req.prompt_tokens + trace.generated_tokens > self.profile.decode.kv_capacity_tokens:
            self.outcomes[req.index].rejected = "kv capacity"
            return
        fit = self.profile.router_ms
        ms = self.noise.draw(fit, fit.predict(prompt_tokens=req.prompt_tokens, images=trace.num_images,
                                              megapixels=trace.megapixels))
        self._overhead(ms, functools.partial(self._encode if trace.images else self._prefill, req))

    def _encode(self, req: _Req) -> None:
        if self.candidate.encode_colocated:
            self._encode_colocated(req)
            return
        shards: dict[int, list] = {}
        for image in req.trace.images:
            replica = min(range(len(self.encoders)), key=lambda i: (self.encoders[i].outstanding
                                                                     + len(shards.get(i, ())), i))
            shards.setdefault(replica, []).append(image)
        req.pending_shards = len(shards)
        for replica, images in shards.items():
            self._encode_shard(req, self.encoders[replica], images)

    def _encode_colocated(self, req: _Req) -> None:
        """E+P: all the request's images are encoded on the prefill replica that will prefill it, the
        one predicted to finish its encode and prefill work soonest after the work queued there.
        Its prefill would cost the same on every replica (one fit, one prefix cache), so only the
        queued work and the encode work tell them apart; the router cannot know the embedding
        cache's hits in advance, so every image counts."""
        images = req.trace.images
        megapixels = req.trace.megapixels
        req.replica = min(self.prefills, key=lambda r: r.predicted_finish(0.0, len(images), megapixels))
        req.pending_shards = 1
        self._encode_shard(req, req.replica.encoder, list(images))

    def _encode_shard(self, req: _Req, replica: _EncodeReplica, images: list) -> None:
        misses = [image for image in images if not self.embeddings.hit(image.hash)]
        megapixels = sum(image.megapixels for image in images)
        enc = self.profile.encode
        if not misses:
            ms = self.noise.draw(enc.hit_call_ms, enc.hit_call_ms.predict(images=len(images)))
            self._overhead(ms, functools.partial(self._shard_done, req))
            return
        overhead = self.noise.draw(enc.call_ms, enc.call_ms.predict(images=len(images), megapixels=megapixels))
        left = [len(misses)]

        def one_done(image) -> None:
            self.embeddings.add(image.hash)
            left[0] -= 1
            if left[0] == 0:
                self._overhead(overhead, functools.partial(self._shard_done, req))
        for image in misses:
            replica.submit((self.clock.now, image.megapixels, functools.partial(one_done, image)))

    def _shard_done(self, req: _Req) -> None:
        req.pending_shards -= 1
        if req.pending_shards == 0:
            self._prefill(req)

    def _cached_tokens(self, req: _Req) -> int:
        if not self._uses_prefix_cache(req):
            return 0
        hits = 0
        for block in req.trace.prefix_blocks:
            if not self.prefixes.hit(block):
                break
            hits += 1
        return min(hits * TRACE_BLOCK_TOKENS, req.prompt_tokens - 1)

    def _uses_prefix_cache(self, req: _Req) -> bool:
        return self.candidate.prefix_cache and not self.candidate.fastkv and bool(req.trace.prefix_blocks)

    def _publish_prefix(self, req: _Req) -> None:
        """A prefill replica's blocks of this prompt become reusable (a local prefill publishes none)."""
        if self._uses_prefix_cache(req):
            for block in req.trace.prefix_blocks:
                self.prefixes.add(block)

    def _prefill(self, req: _Req) -> None:
        pre, fastkv = self.profile.prefill, self.candidate.fastkv
        cached = self._cached_tokens(req)
        ms = self.noise.draw(pre.compute_fit(fastkv), pre.compute_ms_for(req.prompt_tokens, cached, fastkv))
        call = self.noise.draw(pre.call_ms, pre.call_ms.predict(tokens=req.prompt_tokens - cached,
                                                                images=req.trace.num_images))
        replica = req.replica if req.replica is not None else min(self.prefills, key=lambda r: r.predicted_finish(ms))
        if self._prefilled_locally(req, replica.predicted_finish(ms) - self.clock.now + call / 1000.0):
            return
        self._publish_prefix(req)
        replica.submit(ms, lambda: self._overhead(call, functools.partial(self._first_token, req)))

    def _prefilled_locally(self, req: _Req, remote_s: float) -> bool:
        """E -> PD when the prompt is short enough and its first token is predicted sooner on the
        least loaded decode replica (the decode model prefills it whole: no prefix cache, no FastKV)."""
        if req.prompt_tokens > self.candidate.local_prefill_tokens or req.trace.generated_tokens < 1:
            return False
        pre = self.profile.prefill
        ms = self.noise.draw(pre.compute_fit(False), pre.compute_ms_for(req.prompt_tokens, 0, False))
        decode = min(self.decoders, key=lambda r: r.load)
        if decode.local_prefill_wait_s() + ms / 1000.0 > remote_s:   # a tie goes to E -> PD, as in the router
            return False
        decode.submit_local_prefill(ms, functools.partial(self._first_token_local, req, decode))
        return True

    def _first_token_local(self, req: _Req, decode: _DecodeReplica) -> None:
        if self._first_token_out(req):
            decode.submit(_decoding(req, req.prompt_tokens))

    def _first_token(self, req: _Req) -> None:
        if not self._first_token_out(req):
            return
        fit = self.profile.decode.join_ms
        kv_rows = self.profile.prefill.kv_rows(req.prompt_tokens, self.candidate.fastkv)
        delay = self.noise.draw(fit, fit.predict(kv_tokens=kv_rows))
        replica = min(self.decoders, key=lambda r: r.load)
        self._overhead(delay, functools.partial(replica.submit, _decoding(req, kv_rows)))

    def _first_token_out(self, req: _Req) -> bool:
        """Record the TTFT now; True when tokens are left to decode (else the request is done)."""
        now = self.clock.now
        req.first_token_s = now
        outcome = self.outcomes[req.index]
        outcome.ttft_s = now - req.trace.arrival_s
        if req.trace.generated_tokens <= 1:
            outcome.e2e_s = outcome.ttft_s
            return False
        return True

    def finish(self, req: _Req, now: float) -> None:
        outcome = self.outcomes[req.index]
        outcome.e2e_s = now - req.trace.arrival_s
        outcome.tpot_s = (now - req.first_token_s) / (req.trace.generated_tokens - 1)


def simulate(requests: Sequence[TraceRequest], profile: Profile, candidate: Candidate, *, seed: int = 0) -> SimResult:
    return Simulation(profile, candidate, seed=seed).run(requests)
