"""The decode scheduler: continuous batching over a paged KV cache.

Invariant (holds after every `step`): each job is in exactly one of waiting, running, or gone;
a running sequence owns a KV row reserving its stored rows plus every token it may still
generate, so admission is the only place KV can run out; an abort (or finish) frees the row in
the step that sees it; every running sequence produced exactly one token in each step since its
admission, sampled with sampling step `produced` (the prefill sampled step 0), so its stream
equals a single-sequence decode of the same request.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import torch

from epdserve.engine.sampler import SamplingParams, sample_token
from services.decode.insertion import SlotView
from services.decode.local_prefill import LocalPrefill, PromptJob
from services.decode.runner import BatchRunner


@dataclasses.dataclass
class DecodeJob:
    """A request's prompt KV and limits. `layers` (per layer [2, H_kv, n_l, D]) may be views into
    the hand-off cache until the engine reports the job in `StepResult.inputs_done`."""

    request_id: str
    layers: list[torch.Tensor]
    length: int  # logical prompt length (>= every n_l)
    first_token: int
    max_new_tokens: int
    sampling: SamplingParams
    stop_token_ids: frozenset[int] = frozenset()

    @property
    def reserve_tokens(self) -> int:
        return max(int(layer.shape[2]) for layer in self.layers) + self.max_new_tokens


@dataclasses.dataclass
class RunningSequence:
    job: DecodeJob
    row: int
    last_token: int
    prompt_rows: int  # the most KV rows any layer of the prompt holds
    produced: int = 0

    @property
    def rows_after_step(self) -> int:
        """KV rows the longest layer holds once the next step has written its row."""
        return self.prompt_rows + self.produced + 1


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token: int
    finish: str  # "" while running, else "stop" | "length"


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What the runner executes this step: one token for each running sequence, in this order."""

    sequences: tuple[RunningSequence, ...]
    rows: torch.Tensor    # int64 [B] KV rows
    tokens: torch.Tensor  # int64 [B] tokens to append
    max_kv_rows: int      # the most KV rows any sequence attends this step


@dataclasses.dataclass
class StepResult:
    inputs_done: list[str] = dataclasses.field(default_factory=list)  # input layers no longer read
    tokens: list[TokenEvent] = dataclasses.field(default_factory=list)
    aborted: list[str] = dataclasses.field(default_factory=list)
    batch_size: int = 0


class DecodeEngine:
    """Owns the waiting queue, the running batch and the KV cache; every method runs on the model
    thread (the service hands arrivals and aborts in through `step`)."""

    def __init__(self, runner: BatchRunner, local: LocalPrefill | None = None) -> None:
        """`local`: prompts prefilled here (E -> PD), None when this engine only takes KV."""
        self.runner, self.kv, self.local = runner, runner.kv, local
        self.waiting: collections.deque[DecodeJob] = collections.deque()
        self.running: dict[str, RunningSequence] = {}
        self._private: set[str] = set()  # waiting jobs whose layers are already private copies
        self.generated_tokens = 0  # every token this engine produced, read by the metrics

    def step(self, arrivals: list[DecodeJob | PromptJob] = (), aborts: list[str] = ()) -> StepResult:
        result = StepResult()
        self._accept(arrivals)
        self._abort(aborts, result)
        prompts = self.local.choose(self._slots()) if self.local is not None and self.local.queue else []
        if prompts:  # a prefill step: the running decodes pause for it
            self._prefill(prompts, result)
        self._admit(result)
        if self.running and not prompts:
            self._decode(result)
        self.generated_tokens += len(result.tokens)
        return result

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or (self.local is not None and self.local.queue))

    def reset(self) -> list[str]:
        """Drop every job (after a failed step); returns their request ids."""
        dropped = [*self.running, *(job.request_id for job in self.waiting)]
        if self.local is not None:
            dropped += [job.request_id for job in self.local.drop({job.request_id for job in self.local.queue})]
        for seq in list(self.running.values()):
            self._finish(seq)
        self.waiting.clear()
        self._private.clear()
        return dropped

    # -- scheduling ------------------------------------------------------------------------
    def _accept(self, arrivals) -> None:
        for job in arrivals:
            if isinstance(job, PromptJob):
                if self.local is None:
                    raise ValueError("this decode engine does not prefill prompts")
                self.local.queue.append(job)
            else:
                self.waiting.append(job)

    def _slots(self) -> list[SlotView]:
        """What the insertion policy sees as occupied slots: running and KV-waiting sequences."""
        running = [SlotView(s.produced, s.job.max_new_tokens - s.produced) for s in self.running.values()]
        return running + [SlotView(0, job.max_new_tokens) for job in self.waiting]

    def _prefill(self, prompts: list[PromptJob], result: StepResult) -> None:
        """Prefill the chosen prompts; each emits its first token and, unless that finished it,
        joins the front of the KV queue (its layers are private memory)."""
        for job, out in reversed(list(zip(prompts, self.local.prefill(prompts)))):
            result.inputs_done.append(job.request_id)
            first = out.first_token_id
            finish = "stop" if first in job.stop_token_ids else "length" if job.max_new_tokens == 1 else ""
            result.tokens.append(TokenEvent(job.request_id, first, finish))
            if not finish:
                self.waiting.appendleft(DecodeJob(job.request_id, out.kv_layers, out.length, first,
                                                  job.max_new_tokens - 1, job.sampling, job.stop_token_ids))
                self._private.add(job.request_id)

    def _decode(self, result: StepResult) -> None:
        start = time.perf_counter()
        plan = self._plan()
        logits = self.runner.run(plan.rows, plan.tokens, plan.max_kv_rows)
        self._postprocess(plan, logits, result)
        if self.local is not None:
            self.local.times.record("decode", len(plan.sequences), time.perf_counter() - start)

    def _abort(self, request_ids: list[str], result: StepResult) -> None:
        if not request_ids:
            return
        wanted = set(request_ids)
        if self.local is not None:
            for job in self.local.drop(wanted):
                result.inputs_done.append(job.request_id)
                result.aborted.append(job.request_id)
        for job in [j for j in self.waiting if j.request_id in wanted]:
            self.waiting.remove(job)
            self._private.discard(job.request_id)
            result.inputs_done.append(job.request_id)
            result.aborted.append(job.request_id)
        for request_id in wanted & self.running.keys():
            self._finish(self.running[request_id])
            result.aborted.append(request_id)

    def _admit(self, result: StepResult) -> None:
        """FIFO admission by free KV; a job that must wait gets private copies of its layers so the
        hand-off leases can end."""
        while self.waiting and self.kv.can_allocate(self.waiting[0].reserve_tokens):
            job = self.waiting.popleft()
            row = self.kv.allocate(job.reserve_tokens)
            self.kv.load(row, job.layers, job.length)
            prompt_rows = max(int(layer.shape[2]) for layer in job.layers)
            self.running[job.request_id] = RunningSequence(job, row, job.first_token, prompt_rows)
            if job.request_id not in self._private:
                result.inputs_done.append(job.request_id)
            self._private.discard(job.request_id)
            job.layers = []
        for job in self.waiting:
            if job.request_id not in self._private:
                job.layers = [layer.clone() for layer in job.layers]
                self._private.add(job.request_id)
                result.inputs_done.append(job.request_id)

    def _plan(self) -> StepPlan:
        sequences = tuple(self.running.values())
        device = self.kv.device
        rows = torch.tensor([s.row for s in sequences], dtype=torch.int64).to(device, non_blocking=True)
        tokens = torch.tensor([s.last_token for s in sequences], dtype=torch.int64).to(device, non_blocking=True)
        return StepPlan(sequences, rows, tokens, max(s.rows_after_step for s in sequences))

    def _postprocess(self, plan: StepPlan, logits: torch.Tensor, result: StepResult) -> None:
        result.batch_size = len(plan.sequences)
        for seq, token in zip(plan.sequences, self._sample(plan, logits)):
            seq.produced += 1
            seq.last_token = token
            job = seq.job
            finish = "stop" if token in job.stop_token_ids else "length" if seq.produced == job.max_new_tokens else ""
            result.tokens.append(TokenEvent(job.request_id, token, finish))
            if finish:
                self._finish(seq)

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> list[int]:
        """Greedy rows from one batched argmax (one device sync); others with the seeded sampler."""
        greedy = torch.argmax(logits, dim=-1).tolist()
        return [greedy[i] if seq.job.sampling.greedy else sample_token(logits[i], seq.job.sampling, seq.produced + 1)
                for i, seq in enumerate(plan.sequences)]

    def _finish(self, seq: RunningSequence) -> None:
        self.kv.free(seq.row)
        del self.running[seq.job.request_id]
