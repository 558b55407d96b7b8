"""Placement: which replica of each stage serves a request, and whether it takes E -> P -> D or
E -> PD (the decode replica prefills the prompt itself).

Invariant: every choice minimises a predicted time computed from the replicas' latest load
reports together with this router's own outstanding work on them (so decisions made between two
reports see each other). A replica without a measured rate is predicted with the defaults, so
placement degrades to least-outstanding, never to "always the first replica".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from services.router.pools import Replica
from services.router.prefix_view import NOTHING_CACHED, CachedPrefix


@dataclasses.dataclass(frozen=True)
class CostDefaults:
    """Used until the replicas have measured their own rates."""

    prefill_tokens_per_s: float = 4000.0
    encode_images_per_s: float = 20.0
    decode_step_s: float = 0.02
    kv_transfer_bytes_per_s: float = 5e9  # moving cached prefix blocks between hosts / devices


@dataclasses.dataclass(frozen=True)
class Choice:
    replica: Replica
    predicted_s: float     # queue wait + service time of this request there (TTFT part; decode: step time)
    cached_tokens: int = 0  # prefill: leading prompt tokens it would load from the prefix cache


def service_rate(replica: Replica, default: float) -> float:
    """The replica's fitted rate (work units per second), `default` before it measured one."""
    load = replica.load
    return load.work_per_s if load is not None and load.work_per_s > 0 else default


def queued(replica: Replica) -> tuple[int, int]:
    """(work units, requests) in front of a new request: the replica's report or, when this
    router has sent more since, its own count."""
    load = replica.load
    reported_work = load.queued_work if load is not None else 0
    reported_requests = load.queued_requests + load.running_requests if load is not None else 0
    return max(reported_work, replica.outstanding_work), max(reported_requests, replica.outstanding)


def finish_time_s(replica: Replica, work: int, default_rate: float) -> float:
    """Predicted time until `work` more units would be done on `replica`: everything queued there
    first, at the replica's fitted rate and per-request overhead."""
    queued_work, queued_requests = queued(replica)
    overhead = replica.load.overhead_ms / 1000.0 if replica.load is not None else 0.0
    return (queued_work + work) / service_rate(replica, default_rate) + overhead * (queued_requests + 1)


def backlog_s(replica: Replica, default_rate: float) -> float:
    """Predicted time until the work queued on `replica` is done (0 when it has none)."""
    queued_work, queued_requests = queued(replica)
    if queued_requests == 0:
        return 0.0
    overhead = replica.load.overhead_ms / 1000.0 if replica.load is not None else 0.0
    return queued_work / service_rate(replica, default_rate) + overhead * queued_requests


def choose_prefill(replicas: Sequence[Replica], tokens: int, defaults: CostDefaults,
                   cached: Mapping[int, CachedPrefix] | None = None,
                   ahead_s: Mapping[int, float] | None = None) -> Choice:
    """The prefill replica with the smallest predicted TTFT for this prompt (Mooncake): its queue,
    then the tokens not in its cached prefix (`cached`: replica index -> prefix it would load), plus
    moving the cached blocks it does not hold. The queue term is the load-balance guard: cache
    affinity wins only while the affine replica's queue is shorter than the work it saves.
    `ahead_s` (replica index -> seconds): other work its model thread runs first (E+P colocated:
    the encode work queued there, and this request's images when it would encode them). Only
    replicas whose cache pool has room for the prompt's KV now are considered (all of them when
    none has: the prompt then waits there for decode to take earlier KV). A replica that has not
    measured its rate yet is taken to run at its peers' (`measured_rate`)."""
    unmeasured_rate = prefill_rate(replicas, defaults)

    def choice(r: Replica) -> Choice:
        hit = (cached or {}).get(r.index, NOTHING_CACHED)
        compute_s = finish_time_s(r, tokens - hit.tokens, unmeasured_rate)
        compute_s += (ahead_s or {}).get(r.index, 0.0)
        return Choice(r, compute_s + hit.transfer_bytes(r.load) / defaults.kv_transfer_bytes_per_s, hit.tokens)

    with_room = [r for r in replicas if kv_room_fits(r, tokens)] or replicas
    return min((choice(r) for r in with_room), key=lambda c: (c.predicted_s, c.replica.index))


def kv_room_fits(replica: Replica, tokens: int) -> bool:
    """Whether the prefill replica's pool (as last reported) has room for a prompt's KV now."""
    load = replica.load
    if load is None or load.kv_bytes_per_token == 0:
        return True
    return load.kv_pool_room_bytes >= tokens * load.kv_bytes_per_token


def decode_batch(replica: Replica) -> int:
    """Sequences the replica will be decoding: reported running + queued, or this router's count."""
    load = replica.load
    reported = load.running_requests + load.queued_requests if load is not None else 0
    return max(reported, replica.outstanding)


def kv_fits(replica: Replica, reserve_tokens: int) -> bool:
    """Whether the replica's free KV (as last reported) holds `reserve_tokens` more rows."""
    load = replica.load
    if load is None or load.total_kv_blocks == 0:
        return True
    return load.free_kv_blocks * load.kv_block_tokens >= reserve_tokens


def choose_decode(replicas: Sequence[Replica], reserve_tokens: int, defaults: CostDefaults) -> Choice:
    """Among replicas whose free KV holds the request (all of them if none does: it then waits for
    KV there), the one with the most batch headroom; predicted_s is its recent step time."""
    fitting = [r for r in replicas if kv_fits(r, reserve_tokens)] or list(replicas)

    def fullness(r: Replica) -> tuple[float, int, int]:
        capacity = r.load.max_running if r.load is not None and r.load.max_running else 1
        free_kv = r.load.free_kv_blocks if r.load is not None else 0
        return decode_batch(r) / capacity, -free_kv, r.index

    best = min(fitting, key=fullness)
    step = best.load.step_ms / 1000.0 if best.load is not None and best.load.step_ms > 0 else defaults.decode_step_s
    return Choice(best, step)


def shard_images(replicas: Sequence[Replica], images: int, defaults: CostDefaults) -> dict[int, list[int]]:
    """Spread a request's images over encode replicas (EPD intra-request parallelism): each image
    goes where it would finish first given the images already placed (a replica that has not
    measured its rate yet at its peers' rate). Returns replica index -> image positions (in order),
    no empty entry."""
    placed: dict[int, list[int]] = {}
    by_index = {r.index: r for r in replicas}
    unmeasured_rate = encode_rate(replicas, defaults)
    for position in range(images):
        def finish(r: Replica) -> tuple[float, int]:
            return finish_time_s(r, len(placed.get(r.index, ())) + 1, unmeasured_rate), r.index
        best = min(by_index.values(), key=finish)
        placed.setdefault(best.index, []).append(position)
    return placed


def measured_rate(replicas: Sequence[Replica], default: float) -> float:
    """The stage's measured rate (mean over its replicas that measured one; `default` when none
    has). What a replica that has not measured its own rate yet is taken to run at: with a fixed
    pessimistic default it would look slower than its measured peers, get no work while they keep
    up, and so never measure one."""
    rates = [r.load.work_per_s for r in replicas if r.load is not None and r.load.work_per_s > 0]
    return sum(rates) / len(rates) if rates else default


def prefill_rate(replicas: Sequence[Replica], defaults: CostDefaults) -> float:
    return measured_rate(replicas, defaults.prefill_tokens_per_s)


def encode_rate(replicas: Sequence[Replica], defaults: CostDefaults) -> float:
    return measured_rate(replicas, defaults.encode_images_per_s)


def local_prefill_time_s(decode: Replica, tokens: int, rate: float, step_s: float) -> float:
    """Predicted TTFT of E -> PD on `decode`: the step in progress (if it is decoding), the local
    prompts queued there, then this prompt at the model's prefill rate."""
    queued_work, _ = queued(decode)
    in_progress = step_s if decode_batch(decode) > 0 else 0.0
    return in_progress + (queued_work + tokens) / rate


def local_prefill_allowed(decode: Replica, tokens: int, router_limit: int) -> bool:
    load = decode.load
    return 0 < tokens <= router_limit and load is not None and 0 < tokens <= load.local_prefill_max_tokens
