"""FastKV (ALGORITHMS.md §3): token-selective propagation (TSP) and GQA-aware KV compression.

Invariants: scores come from the last `window` queries recomputed by hand (never an eager
attention layer); one selection per KV head (group scores summed after pooling; the `per-head`
ablation sums the query heads' own top-k picks instead, same budget); the window is
always kept and never scored; the TSP index set is sorted, in range, of the exact size and holds
the window; surviving tokens keep their original positions. With budget >= n and TSP length >= n
nothing is selected and the lossless path runs unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from epdserve.config import FASTKV_HEAD_SELECTIONS

POOLINGS = ("avg", "max")


@dataclasses.dataclass(frozen=True)
class FastKVConfig:
    tsp_rate: float = 0.2        # TSP length = ceil(tsp_rate * prompt length) (v2 proportional mode)
    retain_rate: float = 0.1     # KV kept per layer and KV head = ceil(retain_rate * prompt length)
    tsp_length: int = 0          # > 0: a fixed TSP length (v1 constant mode; 2048 in the paper)
    kv_budget: int = 0           # > 0: a fixed KV budget per layer and KV head (v1: 512)
    tsp_layer: int = -1          # 0-based; -1: layer 15 of 32 scaled to the model's depth
    window: int = 8
    pool_kernel: int = 7
    pooling: str = "avg"
    head_selection: str = "group"

    def __post_init__(self) -> None:
        for name in ("tsp_rate", "retain_rate"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"fastkv {name} must be in (0, 1] (got {value})")
        if self.window < 1 or self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"fastkv window must be >= 1 and pool_kernel odd (got {self.window}, {self.pool_kernel})")
        if self.pooling not in POOLINGS:
            raise ValueError(f"fastkv pooling must be one of {POOLINGS} (got {self.pooling!r})")
        if self.head_selection not in FASTKV_HEAD_SELECTIONS:
            raise ValueError(f"fastkv head_selection must be one of {FASTKV_HEAD_SELECTIONS} "
                             f"(got {self.head_selection!r})")
        if self.tsp_length < 0 or self.kv_budget < 0:
            raise ValueError("fastkv tsp_length and kv_budget must be >= 0")

    def plan(self, num_layers: int, prompt_length: int) -> "FastKVPlan":
        tsp_layer = self.tsp_layer if self.tsp_layer >= 0 else round(15 * num_layers / 32)
        if tsp_layer >= num_layers:
            raise ValueError(f"fastkv tsp_layer {tsp_layer} is not a layer of this model (0..{num_layers - 1})")
        tsp_length = self.tsp_length or math.ceil(self.tsp_rate * prompt_length)
        budget = self.kv_budget or math.ceil(self.retain_rate * prompt_length)
        return FastKVPlan(self, num_layers, tsp_layer, max(tsp_length, self.window), max(budget, self.window))


@dataclasses.dataclass(frozen=True)
class FastKVPlan:
    """The settings resolved for one prompt: which layer selects, how many tokens go on, how many
    KV entries each layer keeps per KV head."""
    config: FastKVConfig
    num_layers: int
    tsp_layer: int
    tsp_length: int
    kv_budget: int

    def compresses(self, n: int) -> bool:
        return n > self.kv_budget

    def propagates_subset(self, layer: int, n: int) -> bool:
        """TSP at this layer (the last layer has no later layers to propagate to)."""
        return layer == self.tsp_layer < self.num_layers - 1 and n > self.tsp_length

    def stored_lengths(self, prompt_length: int) -> list[int]:
        """KV entries each layer stores per KV head for a prompt of this length, known before it
        runs: the tokens a layer sees (all of them up to the TSP layer, the TSP selection after),
        at most the budget."""
        lengths, n = [], prompt_length
        for layer in range(self.num_layers):
            lengths.append(min(n, self.kv_budget))
            if self.propagates_subset(layer, n):
                n = self.tsp_length
        return lengths


def window_scores(q_win: torch.Tensor, keys: torch.Tensor, config: FastKVConfig) -> torch.Tensor:
    """Per-KV-head saliency of every prefix key: q_win [H, w, D] (the last w queries, RoPE applied),
    keys [H_kv, n, D] -> [H_kv, n - w] (pooled per query head, then summed over each group)."""
    pooled = _pooled_head_scores(q_win, keys, config)
    return pooled.view(keys.shape[0], -1, pooled.shape[-1]).sum(dim=1)


def selection_scores(q_win: torch.Tensor, keys: torch.Tensor, config: FastKVConfig,
                     picks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(window_scores, the [H_kv, n - w] scores whose top-k each KV head keeps), from one pass over
    the window. TSP always ranks by window_scores. The kept KV: `group` ranks by window_scores too;
    `per-head` (the ablation of GQA-aware selection) lets each query head pick its own top `picks`
    prefix positions and ranks positions by how many of a KV head's query heads picked them, ties
    broken by the group's summed score."""
    pooled = _pooled_head_scores(q_win, keys, config)                              # [H, n - w]
    kv_heads, prefix = keys.shape[0], pooled.shape[-1]
    grouped = pooled.view(kv_heads, -1, prefix).sum(dim=1)                         # >= 0: softmax sums
    if config.head_selection == "group":
        return grouped, grouped
    picked = torch.zeros_like(pooled).scatter_(1, pooled.topk(min(picks, prefix), dim=-1).indices, 1.0)
    votes = picked.view(kv_heads, -1, prefix).sum(dim=1).double()
    tie_break = pooled.double().view(kv_heads, -1, prefix).sum(dim=1)
    return grouped, votes * (tie_break.max() + 1.0) + tie_break   # float64: the tie-break survives next to the votes


def _pooled_head_scores(q_win: torch.Tensor, keys: torch.Tensor, config: FastKVConfig) -> torch.Tensor:
    """[H, n - w]: attention of the window's queries to each prefix key, summed over the window and
    pooled along the sequence, per query head."""
    heads, w, head_dim = q_win.shape
    kv_heads, n, _ = keys.shape
    expanded = keys.repeat_interleave(heads // kv_heads, dim=0).float()          # [H, n, D]
    logits = torch.matmul(q_win.float(), expanded.transpose(1, 2)) / math.sqrt(head_dim)   # [H, w, n]
    future = torch.ones(w, w, dtype=torch.bool, device=keys.device).triu(1)    # causal inside the window
    logits[:, :, n - w:] = logits[:, :, n - w:].masked_fill(future, float("-inf"))
    per_head = logits.softmax(dim=-1)[:, :, : n - w].sum(dim=1)                 # [H, n - w]
    pool = F.avg_pool1d if config.pooling == "avg" else F.max_pool1d
    return pool(per_head[:, None], kernel_size=config.pool_kernel, stride=1, padding=config.pool_kernel // 2)[:, 0]


def kv_keep_index(scores: torch.Tensor, n: int, budget: int, window: int) -> torch.Tensor:
    """[H_kv, n - w] scores -> [H_kv, budget] stored positions: top (budget - w) prefix positions
    of each KV head, then the window (kept by every head)."""
    top = scores.topk(budget - window, dim=-1).indices
    tail = torch.arange(n - window, n, device=scores.device).expand(scores.shape[0], window)
    return torch.cat((top, tail), dim=-1)


def tsp_index(scores: torch.Tensor, n: int, length: int, window: int) -> torch.Tensor:
    """[H_kv, n - w] scores -> the sorted positions [length] that go on to the next layers."""
    top = scores.sum(dim=0).topk(length - window, dim=-1).indices
    tail = torch.arange(n - window, n, device=scores.device)
    return torch.cat((top, tail)).sort().values


def gather_kv(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys/values [1, H_kv, n, D], index [H_kv, b] -> [1, H_kv, b, D] each."""
    expanded = index[None, :, :, None].expand(1, *index.shape, keys.shape[-1])
    return keys.gather(2, expanded), values.gather(2, expanded)
