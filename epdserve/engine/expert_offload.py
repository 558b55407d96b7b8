"""MoE expert offloading with proactive prefetch (ProMoE, ALGORITHMS.md §6) for Mixtral-style decoders.

`offload_experts(decoder, config)` moves every layer's experts to host memory (pinned on CUDA) and
replaces each layer's `MixtralMoE` by an `OffloadedMoE` (same forward contract). A per-layer cache of
device slots holds some experts; a predictor guesses the experts of layer ℓ+d from layer ℓ's MoE
input (LOW-priority copies), and the gate's real choice turns missing experts into HIGH-priority
copies that start at gate time while cached experts compute.

Invariant (the cache / prefetch protocol):
1. Each layer owns `capacity` device slots, always full. Only the start of a chunk-0 copy changes a
   slot's owner: it evicts exactly one expert, the least recently used unpinned one, and resets
   that expert's ready_chunk to 0. Occupancy is therefore always exactly `capacity`.
2. ready_chunk(ℓ, e) counts the chunks (w1, w3, w2) of e whose copy has completed in its slot. An
   expert is computed only at ready_chunk == 3; on CUDA the compute stream also waits on the slot's
   ready event, and a slot is overwritten only after the free event of the compute that last read it.
3. push_precise(ℓ, E) removes every LOW task of ℓ, pins E (a pinned expert is never a victim) until
   each expert's release(), and queues HIGH tasks for the missing chunks in execution order:
   cached ⊕ partially fetched ⊕ not started, each group in gate order. (The on-demand baseline,
   enable_prefetch=False, instead pins and fetches one expert at a time in acquire(), gate order.)
4. One copier (the worker thread, or the calling thread in inline/manual modes) runs one chunk at
   a time, every HIGH task before any LOW task, so a HIGH task waits for at most one chunk copy.
5. A layer's output sums its expert outputs in ascending expert id, as MixtralMoE does, so outputs
   are bitwise equal to the all-resident model whatever the predictor, the timing or the order.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from epdserve.engine.expert_cache import CHUNKS, ChunkTask, ExpertCache, Group, PrefetchQueue, Priority, execution_order
from epdserve.engine.expert_memory import ChunkCopier, DeviceSlots, ExpertWeights, HostExperts
from epdserve.engine.expert_predictor import ExpertPredictor, LearnedPredictor, SkipGatePredictor, moe_modules
from epdserve.models.layers import MixtralMoE

COPY_MODES = ("thread", "inline", "manual")
DEFAULT_CACHE_RATE = 0.25


@dataclasses.dataclass(frozen=True)
class ExpertOffloadConfig:
    cache_rate: float | None = None    # fraction of all experts resident on the device (0.25 if no budget is set)
    cache_bytes: int | None = None     # or: byte budget of the device expert region (all layers together)
    prefetch_distance: int = 2         # predict layer ℓ + d from layer ℓ's MoE input
    predictor: str = "skip_gate"       # skip_gate | learned | none | custom (instance given to offload_experts)
    predictor_path: str | None = None  # safetensors file of a trained LearnedPredictor (predictor "learned")
    enable_prefetch: bool = True       # False: the on-demand LRU baseline with the same cache (gate order,
                                       # fetch in the compute thread when needed, no predictor)
    copy_mode: str = "thread"          # thread: worker thread + CUDA side stream; inline: the caller copies,
                                       # predicted experts at once ("instant copies"); manual: only when
                                       # compute waits or run_pending() is called (tests)

    def __post_init__(self) -> None:
        if self.cache_rate is not None and self.cache_bytes is not None:
            raise ValueError("set cache_rate or cache_bytes, not both")
        if self.cache_rate is not None and not 0.0 < self.cache_rate <= 1.0:
            raise ValueError(f"cache_rate must be in (0, 1] (got {self.cache_rate})")
        if self.cache_bytes is not None and self.cache_bytes <= 0:
            raise ValueError(f"cache_bytes must be positive (got {self.cache_bytes})")
        if self.prefetch_distance < 1:
            raise ValueError(f"prefetch_distance must be >= 1 (got {self.prefetch_distance})")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor {self.predictor!r} is not one of {sorted(PREDICTORS)}")
        if (self.predictor == "learned") != (self.predictor_path is not None):
            raise ValueError("predictor_path goes with predictor 'learned', and 'learned' needs it")
        if not self.enable_prefetch and self.predictor != "none":
            raise ValueError("enable_prefetch=False is the on-demand baseline: set predictor='none'")
        if self.copy_mode not in COPY_MODES:
            raise ValueError(f"copy_mode {self.copy_mode!r} is not one of {COPY_MODES}")

    def slots_per_layer(self, num_layers: int, num_experts: int, expert_bytes: int) -> int:
        """Device slots per layer for this budget; raises ValueError below one expert per layer."""
        if self.cache_bytes is not None:
            slots = self.cache_bytes // (num_layers * expert_bytes)
        else:
            rate = DEFAULT_CACHE_RATE if self.cache_rate is None else self.cache_rate
            slots = math.floor(rate * num_experts + 1e-9)
        if slots < 1:
            raise ValueError("the expert cache budget holds less than one expert per layer")
        return min(int(slots), num_experts)


@dataclasses.dataclass(frozen=True)
class OffloadStats:
    """Counters since the last reset. A prediction is checked when its target layer's gate runs."""

    predicted: int = 0          # predicted experts checked at their target layer's gate
    predicted_used: int = 0     # ... that the gate chose
    predicted_ready: int = 0    # ... whose copy had completed by then
    precise: int = 0            # experts chosen by gates (distinct per layer call)
    hits: int = 0               # ... fully on the device at gate time
    partial: int = 0            # ... partly copied at gate time
    on_demand: int = 0          # ... not started at gate time (fetched on demand)
    stalls: int = 0             # acquires that waited for a copy
    stall_seconds: float = 0.0  # host time blocked in those waits
    chunks_copied: int = 0
    bytes_copied: int = 0
    copy_seconds: float = 0.0   # copier time from issuing a chunk to its completion
    evictions: int = 0
    preempted_tasks: int = 0    # LOW tasks removed by push_precise (early preemption)
    dropped_tasks: int = 0      # tasks with nothing left to do when popped

    @property
    def accuracy(self) -> float:
        return self.predicted_used / self.predicted if self.predicted else 0.0

    @property
    def fetch_rate(self) -> float:
        return self.predicted_ready / self.predicted if self.predicted else 0.0

    @property
    def good_pred(self) -> float:
        return self.accuracy * self.fetch_rate

    @property
    def hit_rate(self) -> float:
        return self.hits / self.precise if self.precise else 0.0

    def as_dict(self) -> dict[str, float]:
        derived = {k: getattr(self, k) for k in ("accuracy", "fetch_rate", "good_pred", "hit_rate")}
        return {**dataclasses.asdict(self), **derived}


class Prediction(NamedTuple):
    target: int           # the layer the scores are for
    scores: torch.Tensor  # [E] float32 on the compute device, 0 = not predicted


def _zero_counters() -> dict[str, float]:
    return {field.name: field.default for field in dataclasses.fields(OffloadStats)}


class ExpertOffloader:
    """Owns the device expert region, the cache bookkeeping, the chunk task queue and the copier (a
    worker thread in copy_mode 'thread' with prefetch on). All state sits behind one condition
    variable; the compute calls (predict, push_*, acquire, release) come from one thread at a time.
    `close()` stops the worker; the OffloadedMoE modules of a closed offloader raise RuntimeError."""

    def __init__(self, host: HostExperts, config: ExpertOffloadConfig, *, device: torch.device | str,
                 predictor: ExpertPredictor | None = None) -> None:
        self.host, self.config, self.device = host, config, _with_index(torch.device(device))
        capacity = config.slots_per_layer(host.num_layers, host.num_experts, host.expert_bytes)
        self.cache = ExpertCache(host.num_layers, host.num_experts, capacity)
        self.queue = PrefetchQueue()
        self.slots = DeviceSlots(host, capacity, self.device)
        self.predictor = predictor if config.enable_prefetch else None
        _check_predictor(self.predictor, config, host.num_layers)
        self._copier = ChunkCopier(host, self.slots, self.device)
        self._cond = threading.Condition()
        self._counters = _zero_counters()
        self._predicted: dict[int, list[int]] = {}
        self._pass = -1
        self._closed, self._error = False, None
        threaded = config.enable_prefetch and config.copy_mode == "thread"
        self._worker = threading.Thread(target=self._worker_loop, name="expert-prefetch", daemon=True) \
            if threaded else None

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> "ExpertOffloader":
        if self._worker is not None and not self._worker.is_alive():
            self._worker.start()
        return self

    def close(self) -> None:
        """Stop the worker (queued copies are abandoned), wait for the side stream and the device,
        and free the device region. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker is not None and self._worker.is_alive():
            self._worker.join()
        self._copier.synchronize()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.slots.release()

    def __enter__(self) -> "ExpertOffloader":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- queries ----------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def ready_chunk(self, layer: int, expert: int) -> int:
        with self._cond:
            return self.cache.ready_chunk(layer, expert)

    def resident(self, layer: int) -> list[int]:
        with self._cond:
            return self.cache.resident(layer)

    def queue_snapshot(self) -> list[ChunkTask]:
        with self._cond:
            return self.queue.snapshot()

    def stats(self) -> OffloadStats:
        with self._cond:
            return OffloadStats(**self._counters)

    def reset_stats(self) -> None:
        with self._cond:
            self._counters = _zero_counters()
            self._predicted.clear()

    # ---- the protocol, called by OffloadedMoE -----------------------------------------------------------
    def predict(self, layer: int, hidden: torch.Tensor) -> Prediction | None:
        """At layer `layer`'s MoE input (layer 0 starts a forward pass): the predictor's scores for
        layer + distance (or, for a wrapping predictor, that layer of the next pass). Reads hidden."""
        self._pass += layer == 0
        if self.predictor is None:
            return None
        target, step = layer + self.config.prefetch_distance, self._pass
        if target >= self.host.num_layers:
            if not self.predictor.wraps:
                return None
            target, step = target - self.host.num_layers, step + 1
        scores = self.predictor.priority(layer, target, step, hidden)
        return None if scores is None else Prediction(target, scores)

    def push_predicted(self, layer: int, experts: Sequence[int]) -> None:
        """Speculation for `layer` (best first; at most `capacity` are kept): resident ones become
        most recently used, missing chunks are queued LOW. Inline mode copies them before returning."""
        experts = list(dict.fromkeys(experts))[: self.capacity]
        with self._cond:
            self._raise_if_closed()
            seen = self._predicted.setdefault(layer, [])
            seen.extend(e for e in experts if e not in seen)
            for e in experts:
                self.cache.touch(layer, e)
                self._queue_missing(layer, e, Priority.LOW)
            self._cond.notify_all()
        if self._worker is None and self.config.copy_mode == "inline":
            self.run_pending()

    def push_precise(self, layer: int, experts: Sequence[int]) -> list[int]:
        """The gate of `layer` chose `experts` (distinct). Drops the layer's LOW tasks, pins exactly
        these experts until their release(), queues HIGH tasks for missing chunks, and returns the
        execution order (reordered inference). The on-demand baseline only returns ascending ids:
        its acquire() pins and fetches one expert at a time."""
        with self._cond:
            self._raise_if_closed()
            self._counters["preempted_tasks"] += self.queue.drop_low(layer)
            self._check_prediction(layer, experts)
            if not self.config.enable_prefetch:
                return sorted(experts)
            order = execution_order(self.cache, layer, experts)
            self._count_groups(layer, order)
            self.cache.pin(layer, order)
            for e in order:
                self._demand(layer, e)
            self._cond.notify_all()
        return order

    def acquire(self, layer: int, expert: int) -> ExpertWeights:
        """Wait until `expert` (pinned by push_precise) is fully on the device and return views of its
        slot, valid until release(layer, expert). On CUDA the current stream waits on the slot's ready
        event. Raises RuntimeError when the expert is not pinned or the offloader is closed."""
        with self._cond:
            if not self.config.enable_prefetch:  # on-demand: fetch now, one pinned expert at a time
                self._count_groups(layer, [expert])
                self.cache.pin(layer, [expert])
                self._demand(layer, expert)
            if expert not in self.cache.pinned(layer):
                raise RuntimeError(f"acquire({layer}, {expert}) without push_precise")
        start = time.perf_counter()
        if self._until_ready(layer, expert):
            with self._cond:
                self._counters["stalls"] += 1
                self._counters["stall_seconds"] += time.perf_counter() - start
        with self._cond:
            slot = self.cache.slot_of(layer, expert)
            assert slot is not None and self.cache.ready_chunk(layer, expert) == CHUNKS
        if self.slots.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.slots.ready[layer][slot])
        return self.slots.weights(layer, slot)

    def release(self, layer: int, expert: int) -> None:
        """The compute reading `expert`'s slot has been issued: record the slot's free event on the
        current stream (CUDA) and unpin the expert, making it evictable."""
        with self._cond:
            slot = self.cache.slot_of(layer, expert)
            if self.slots.free is not None and slot is not None:
                self.slots.free[layer][slot].record(torch.cuda.current_stream(self.device))
            self.cache.unpin(layer, expert)
            self._cond.notify_all()

    def run_pending(self, max_tasks: int | None = None) -> int:
        """Run queued copies in the calling thread (inline/manual modes) until the queue is empty, the
        head HIGH task has no unpinned slot, or `max_tasks` ran. Returns how many ran."""
        if self._worker is not None:
            raise RuntimeError("run_pending is for copy modes without a worker thread")
        ran = 0
        while (max_tasks is None or ran < max_tasks) and self._run_one(block=False):
            ran += 1
        return ran

    # ---- internals ------------------------------------------------------------------------------------
    def _demand(self, layer: int, expert: int) -> None:
        self.cache.touch(layer, expert)
        self._queue_missing(layer, expert, Priority.HIGH)

    def _queue_missing(self, layer: int, expert: int, priority: Priority) -> None:
        for chunk in range(self.cache.ready_chunk(layer, expert), CHUNKS):
            self.queue.push(ChunkTask(layer, expert, chunk, priority))

    def _check_prediction(self, layer: int, experts: Sequence[int]) -> None:
        predicted = self._predicted.pop(layer, None)
        if predicted is None:
            return
        chosen = set(experts)
        self._counters["predicted"] += len(predicted)
        self._counters["predicted_used"] += sum(e in chosen for e in predicted)
        self._counters["predicted_ready"] += sum(self.cache.ready_chunk(layer, e) == CHUNKS for e in predicted)

    def _count_groups(self, layer: int, experts: Sequence[int]) -> None:
        groups = [self.cache.group(layer, e) for e in experts]
        self._counters["precise"] += len(groups)
        self._counters["hits"] += groups.count(Group.CACHED)
        self._counters["partial"] += groups.count(Group.PARTIAL)
        self._counters["on_demand"] += groups.count(Group.NOT_STARTED)

    def _until_ready(self, layer: int, expert: int) -> bool:
        """Block until ready_chunk == 3; True when it had to wait. Without a worker the calling
        thread runs the queued copies itself."""
        if self._worker is None:
            waited = False
            while self.ready_chunk(layer, expert) < CHUNKS:
                if not self._run_one(block=False):
                    raise RuntimeError(f"expert {expert} of layer {layer} is not ready and no queued copy can run")
                waited = True
            return waited
        with self._cond:
            if self.cache.ready_chunk(layer, expert) == CHUNKS:
                return False
            self._cond.wait_for(lambda: self._closed or self.cache.ready_chunk(layer, expert) == CHUNKS)
            self._raise_if_closed()
            return True

    def _run_one(self, *, block: bool) -> bool:
        """Take one task with work to do, copy its chunk (outside the lock), mark it ready."""
        with self._cond:
            taken = self._take(block)
        if taken is None:
            return False
        task, slot = taken
        start = time.perf_counter()
        self._copier.copy(task, slot)
        seconds = time.perf_counter() - start
        with self._cond:
            self.cache.advance(task.layer, task.expert, task.chunk)
            self._counters["chunks_copied"] += 1
            self._counters["bytes_copied"] += self.host.chunk_bytes
            self._counters["copy_seconds"] += seconds
            self._cond.notify_all()
        return True

    def _take(self, block: bool) -> tuple[ChunkTask, int] | None:
        """Under the lock: pop until a task has work; a chunk-0 task claims its slot (eviction). With
        `block` (the worker), wait for tasks and for an unpinned victim; without it, put a blocked HIGH
        task back and return None. Returns None when closed."""
        while not self._closed:
            task = self.queue.pop()
            if task is None:
                if not block:
                    return None
                self._cond.wait()
            elif not self.cache.wants(task) or (self.cache.victim(task.layer) is None and task.chunk == 0
                                                and task.priority is Priority.LOW):
                self._counters["dropped_tasks"] += 1
            elif task.chunk > 0:
                return task, self.cache.slot_of(task.layer, task.expert)
            elif self.cache.victim(task.layer) is None and not block:
                self.queue.push_front(task)
                return None
            else:
                self._cond.wait_for(lambda t=task: self._closed or self.cache.victim(t.layer) is not None)
                if self._closed:
                    return None
                self._counters["evictions"] += 1
                return task, self.cache.claim(task.layer, task.expert).slot
        return None

    def _worker_loop(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            while self._run_one(block=True):
                pass
        except BaseException as exc:  # surfaced to the compute thread by _raise_if_closed
            with self._cond:
                self._error, self._closed = exc, True
                self._cond.notify_all()

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise RuntimeError("the expert offloader is closed") from self._error


class OffloadedMoE(nn.Module):
    """One layer's MixtralMoE with its experts in an ExpertOffloader: x [..., d] -> same shape,
    bitwise equal to MixtralMoE on the same weights. Holds the layer's gate (on the device); the
    expert weights belong to the offloader."""

    def __init__(self, layer: int, gate: nn.Linear, top_k: int, act: nn.Module, offloader: ExpertOffloader) -> None:
        super().__init__()
        self.layer, self.gate, self.top_k, self.act = layer, gate, top_k, act
        self.offloader = offloader

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, d] -> (weights [N, k] float32, expert ids [N, k]), exactly MixtralMoE's routing."""
        return MixtralMoE.route(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, experts = self.route(flat)
        prediction = self.offloader.predict(self.layer, flat)
        chosen, predicted = _to_host(experts, prediction, self.offloader.capacity)
        if prediction is not None:
            self.offloader.push_predicted(prediction.target, predicted)
        used = sorted(set(chosen.reshape(-1).tolist()))
        order = self.offloader.push_precise(self.layer, used)
        groups = _token_groups(chosen, used, flat.device)
        outputs = {e: self._expert(e, flat, weights, *groups[e]) for e in order}
        out = torch.zeros_like(flat)
        for e in used:  # canonical ascending expert order, as MixtralMoE: the same sum, bit for bit
            out.index_add_(0, groups[e][0], outputs[e].to(out.dtype))
        return out.reshape(shape)

    def _expert(self, expert: int, flat: torch.Tensor, weights: torch.Tensor, tokens: torch.Tensor,
                slot: torch.Tensor) -> torch.Tensor:
        w = self.offloader.acquire(self.layer, expert)
        try:
            x = flat[tokens]
            y = F.linear(self.act(F.linear(x, w.w1)) * F.linear(x, w.w3), w.w2)  # Expert.forward
        finally:
            self.offloader.release(self.layer, expert)
        return y * weights[tokens, slot, None]


def _with_index(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _to_host(experts: torch.Tensor, prediction: Prediction | None, capacity: int) -> tuple[torch.Tensor, list[int]]:
    """One device -> host transfer for the routing ids [N, k] and the ranked prediction (best first,
    predicted experts only, at most `capacity`)."""
    if prediction is None:
        return experts.cpu(), []
    ranked = torch.argsort(prediction.scores, descending=True, stable=True)
    count = (prediction.scores > 0).sum().reshape(1)
    packed = torch.cat([experts.reshape(-1), ranked, count]).cpu()
    n = experts.numel()
    return packed[:n].view(experts.shape), packed[n:n + min(int(packed[-1]), capacity)].tolist()


def _token_groups(chosen: torch.Tensor, used: list[int], device: torch.device
                  ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per expert, the (token, top-k slot) indices routed to it (MixtralMoE's torch.where, same
    order), computed on the host and moved to the device in one copy."""
    parts = [torch.stack(torch.where(chosen == e)) for e in used]
    both = torch.cat(parts, dim=1).to(device, non_blocking=True)
    return {e: (part[0], part[1]) for e, part in zip(used, both.split([p.shape[1] for p in parts], dim=1))}


# ---- building --------------------------------------------------------------------------------------------

def _skip_gate(config: ExpertOffloadConfig, modules: list[nn.Module], device: torch.device) -> ExpertPredictor:
    return SkipGatePredictor([m.gate for m in modules], modules[0].top_k)


def _learned(config: ExpertOffloadConfig, modules: list[nn.Module], device: torch.device) -> ExpertPredictor:
    return LearnedPredictor.load(config.predictor_path, device=device)


# name -> factory(config, moe modules, device); "none" and "custom" build nothing
PREDICTORS = {"skip_gate": _skip_gate, "learned": _learned, "none": None, "custom": None}


def _check_predictor(predictor: ExpertPredictor | None, config: ExpertOffloadConfig, num_layers: int) -> None:
    if predictor is None:
        return
    if config.prefetch_distance >= num_layers:
        raise ValueError(f"prefetch_distance {config.prefetch_distance} must be below the layer count {num_layers}")
    if predictor.distance is not None and predictor.distance != config.prefetch_distance:
        raise ValueError(f"the predictor was built for distance {predictor.distance}, "
                         f"config asks for {config.prefetch_distance}")


def offload_experts(decoder: nn.Module, config: ExpertOffloadConfig, *, predictor: ExpertPredictor | None = None,
                    host: HostExperts | None = None) -> ExpertOffloader:
    """Move every layer's experts to host memory (pinned on CUDA) and replace each layer's MoE module
    by an OffloadedMoE, in place; the decoder's device expert weights are freed once nothing else
    references them. `predictor`: the instance for config.predictor == "custom" (and only then).
    `host`: the HostExperts of an earlier offloader of this decoder (close it first) to change the
    config without copying the experts again. Raises ValueError for a dense decoder or a mismatch."""
    modules = moe_modules(decoder)
    if (config.predictor == "custom") != (predictor is not None):
        raise ValueError("pass a predictor instance exactly when config.predictor == 'custom'")
    if host is None:
        if not all(isinstance(m, MixtralMoE) for m in modules):
            raise ValueError("the decoder's experts are already offloaded: pass host= from its offloader")
        host = HostExperts.from_modules(modules, pin=decoder.device.type == "cuda")
    factory = PREDICTORS[config.predictor]
    if factory is not None:
        predictor = factory(config, modules, decoder.device)
    offloader = ExpertOffloader(host, config, device=decoder.device, predictor=predictor)
    for i, (layer, module) in enumerate(zip(decoder.layers, modules)):
        act = module.act if isinstance(module, OffloadedMoE) else module.experts[0].act
        layer.block_sparse_moe = OffloadedMoE(i, module.gate, module.top_k, act, offloader)
    return offloader.start()
