"""Sampling parameters, their validation, and seeded per-step sampling.

Step `i` of a request draws from a generator seeded by (seed, i) alone, so the same request
gives the same tokens whichever process samples which step (prefill samples step 0,
decode the rest).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from epdserve.errors import InvalidArgumentError

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = -1
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (their limit): logits / 1e-40 overflow to inf
_GOLDEN = 0x9E3779B97F4A7C15
_MASK63 = (1 << 63) - 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = DEFAULT_TEMPERATURE   # 0 (or below GREEDY_BELOW) = greedy
    top_k: int = DEFAULT_TOP_K                  # -1 or 0 = disabled
    top_p: float = DEFAULT_TOP_P                # in (0, 1]
    seed: int = 0

    def __post_init__(self) -> None:
        validate_sampling(self.temperature, self.top_k, self.top_p, self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def validate_sampling(temperature: float, top_k: int, top_p: float, seed: int, *, field_prefix: str = "") -> None:
    """Raise InvalidArgumentError naming the field and its limit."""
    p = field_prefix
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgumentError(f"{p}temperature must be a finite number >= 0 (got {temperature})")
    if top_k < -1:
        raise InvalidArgumentError(f"{p}top_k must be -1 or 0 (disabled) or a positive integer (got {top_k})")
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidArgumentError(f"{p}top_p must be in (0, 1] (got {top_p})")
    if not 0 <= seed < (1 << 64):
        raise InvalidArgumentError(f"{p}seed must be in [0, 2^64) (got {seed})")


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed ^ (step * _GOLDEN)) & _MASK63)


def sample_token(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """logits: [V] for one position. Greedy takes the argmax; otherwise temperature, top-k, top-p."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    scores = logits.detach().to("cpu", torch.float32) / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        probs = _nucleus(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=step_generator(params.seed, step)).item())


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return kept / kept.sum()
