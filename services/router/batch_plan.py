"""Offline batch planning (hybrid offline-online scheduling, the offline part; ALGORITHMS.md §2):
a known set of requests is packed onto decode slots to minimise the makespan.

Invariant: each decode replica offers `B` slots (sequences it decodes at once); every request is
predicted to cost w_i = prefill(s_i) + o_i x step seconds (o_i = its max_tokens: output lengths
are taken as known offline) and occupies one slot for that long. LPT: requests sorted by w_i,
descending (ties: input order), each given to the slot that is free first (ties: the lowest slot).
LPT's makespan is within 4/3 of the optimum, and the optimum is at least
T_LB = max(sum w_i / slots, max w_i), which every plan reports next to its own prediction.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class CostModel:
    prefill_s_per_token: float
    decode_step_s: float

    def seconds(self, prompt_tokens: int, max_tokens: int) -> float:
        return prompt_tokens * self.prefill_s_per_token + max_tokens * self.decode_step_s


@dataclasses.dataclass(frozen=True)
class Slot:
    replica: int  # index of the decode replica
    slot: int     # which of its B concurrent sequences


@dataclasses.dataclass(frozen=True)
class Plan:
    slots: tuple[Slot, ...]
    jobs: tuple[tuple[int, ...], ...]  # per slot, request indices in execution order
    loads_s: tuple[float, ...]         # per slot, predicted busy seconds
    lower_bound_s: float               # T_LB

    @property
    def makespan_s(self) -> float:
        return max(self.loads_s, default=0.0)


def lower_bound_s(costs: Sequence[float], slots: int) -> float:
    return max(sum(costs) / slots, max(costs)) if costs else 0.0


def plan_lpt(costs: Sequence[float], slots: Sequence[Slot]) -> Plan:
    """Longest processing time first over `slots`. Raises ValueError without slots."""
    if not slots:
        raise ValueError("a batch plan needs at least one decode slot")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    free_at = [(0.0, s) for s in range(len(slots))]  # (predicted busy seconds, slot)
    jobs: list[list[int]] = [[] for _ in slots]
    for i in order:
        load, s = heapq.heappop(free_at)
        jobs[s].append(i)
        heapq.heappush(free_at, (load + costs[i], s))
    loads = [0.0] * len(slots)
    for load, s in free_at:
        loads[s] = load
    return Plan(tuple(slots), tuple(tuple(j) for j in jobs), tuple(loads), lower_bound_s(costs, len(slots)))
