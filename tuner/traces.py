"""Workload traces: read the public formats into one record type, and summarise them.

Formats: Azure LLM / LMM CSV (TIMESTAMP, [NumImages,] ContextTokens, GeneratedTokens) and
Mooncake JSONL (timestamp ms, input_length, output_length, hash_ids of 512-token blocks).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import pathlib
from collections.abc import Iterable, Sequence

MOONCAKE_BLOCK_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    arrival_s: float                    # seconds since the first request
    context_tokens: int
    generated_tokens: int
    num_images: int = 0
    prefix_blocks: tuple[int, ...] = ()  # Mooncake hash_ids (equal ids = shared prefix)


def read_trace(path: str | pathlib.Path) -> list[TraceRequest]:
    path = pathlib.Path(path)
    if path.suffix == ".jsonl":
        return _read_mooncake(path)
    if path.suffix == ".csv":
        return _read_azure(path)
    raise ValueError(f"{path.name}: unknown trace format (expected .csv (Azure) or .jsonl (Mooncake))")


def _read_azure(path: pathlib.Path) -> list[TraceRequest]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "ContextTokens" not in rows[0]:
        raise ValueError(f"{path.name}: not an Azure trace (needs TIMESTAMP, ContextTokens, GeneratedTokens)")
    times = [_parse_time(row["TIMESTAMP"]) for row in rows]
    t0 = min(times)
    return [
        TraceRequest(
            arrival_s=t - t0,
            context_tokens=int(row["ContextTokens"]),
            generated_tokens=int(row["GeneratedTokens"]),
            num_images=int(row.get("NumImages") or 0),
        )
        for t, row in zip(times, rows)
    ]


def _parse_time(text: str) -> float:
    text = text.strip().replace("Z", "+00:00")
    if "." in text:  # Azure writes 7 fractional digits; datetime takes at most 6
        head, frac = text.split(".", 1)
        digits = "".join(ch for ch in frac if ch.isdigit())
        tz = frac[len(digits):]
        text = f"{head}.{digits[:6]}{tz}"
    return datetime.datetime.fromisoformat(text).timestamp()


def _read_mooncake(path: pathlib.Path) -> list[TraceRequest]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    t0 = min(r["timestamp"] for r in records)
    return [
        TraceRequest(
            arrival_s=(r["timestamp"] - t0) / 1000.0,
            context_tokens=int(r["input_length"]),
            generated_tokens=int(r["output_length"]),
            prefix_blocks=tuple(r.get("hash_ids", ())),
        )
        for r in records
    ]


@dataclasses.dataclass(frozen=True)
class TraceStats:
    requests: int
    duration_s: float
    mean_rate_rps: float
    context_tokens: dict[str, float]     # p50 / p90 / p99 / mean
    generated_tokens: dict[str, float]
    images_per_request: dict[str, float]
    prefix_reuse: float | None            # fraction of prefix blocks seen before (Mooncake)


def summarize(requests: Sequence[TraceRequest]) -> TraceStats:
    if not requests:
        raise ValueError("empty trace")
    duration = max(r.arrival_s for r in requests)
    return TraceStats(
        requests=len(requests),
        duration_s=duration,
        mean_rate_rps=len(requests) / duration if duration > 0 else math.inf,
        context_tokens=_quantiles([r.context_tokens for r in requests]),
        generated_tokens=_quantiles([r.generated_tokens for r in requests]),
        images_per_request=_quantiles([r.num_images for r in requests]),
        prefix_reuse=_prefix_reuse(requests),
    )


def _quantiles(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": sum(ordered) / len(ordered)}


def _prefix_reuse(requests: Sequence[TraceRequest]) -> float | None:
    """Fraction of prefix blocks, in arrival order, whose hash was already seen (cacheable with an
    unbounded cache)."""
    total = sum(len(r.prefix_blocks) for r in requests)
    if total == 0:
        return None
    seen: set[int] = set()
    reused = 0
    for request in sorted(requests, key=lambda r: r.arrival_s):
        reused += sum(1 for block in request.prefix_blocks if block in seen)
        seen.update(request.prefix_blocks)
    return reused / total
