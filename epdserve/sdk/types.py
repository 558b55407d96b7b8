"""Plain result types of the SDK (no protobuf types leak out)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GenerationChunk:
    text: str                       # newly completed text (whole code points)
    token_ids: tuple[int, ...]      # the tokens this chunk adds


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str              # "stop" | "length" | "abort"
    usage: Usage
    timings_ms: dict[str, float]    # per-stage timings (encode, cache, prefill, KV hand-off, decode, TTFT, TPOT)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    model: str
    revision: str
    max_context: int
    image_tokens_per_image: int
    image_placeholder: str
    vocab_size: int


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """One request of an offline batch, as it finished: `result`, or `error` (typed) if it failed."""

    index: int                      # position in the requests passed to Client.batch
    result: GenerationResult | None
    error: Exception | None = None


@dataclasses.dataclass(frozen=True)
class BatchSummary:
    requests: int
    failed: int
    slots: int                      # decode slots the router planned over
    predicted_makespan_s: float     # the plan's prediction (LPT)
    lower_bound_s: float            # max(total predicted work / slots, longest request)
    makespan_s: float               # measured by the router
