"""Workload traces: read the public formats into one record type, write the canonical one, summarise.

Readable formats (chosen by suffix, then by header):
  .jsonl  Mooncake and its canonical superset (one reader for both):
          {"timestamp": ms, "input_length": text tokens (image tokens excluded), "output_length": n,
           "hash_ids": [512-token prefix blocks], "session_id": "s-42", "delay_ms": 0,
           "images": [{"hash": "a9f3", "width": 1280, "height": 720}]}
          Only timestamp, input_length and output_length are required. A follow-up turn may give
          `delay_ms` (or Dynamo's `delay`) and a session_id instead of a timestamp.
  .csv    Azure LLM 2023/2024 (TIMESTAMP, ContextTokens, GeneratedTokens), Azure LMM 2025 (plus
          NumImages), BurstGPT (Timestamp, Request tokens, Response tokens, ...) and Vidur
          (arrived_at, num_prefill_tokens, num_decode_tokens).
Records come back sorted by arrival, arrivals in seconds since the first request.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuner.synth import SynthSpec

MOONCAKE_BLOCK_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class TraceImage:
    hash: str    # content hash: equal hashes are the same image (an encoder-cache hit)
    width: int
    height: int

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    arrival_s: float                     # seconds since the first request
    context_tokens: int                  # text tokens of the prompt (image tokens excluded)
    generated_tokens: int
    prefix_blocks: tuple[int, ...] = ()  # Mooncake hash_ids (equal ids = shared prefix)
    images: tuple[TraceImage, ...] = ()
    session_id: str = ""                 # multi-turn conversation id ("" = none)
    delay_s: float = 0.0                 # follow-up turn: wait after the previous turn completes

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def megapixels(self) -> float:
        """Of all its images together."""
        return sum(image.megapixels for image in self.images)


def read_trace(path: str | pathlib.Path, image_spec: SynthSpec | None = None) -> list[TraceRequest]:
    """Read any supported trace, sorted by arrival. `image_spec` (default `SynthSpec()`) draws the
    sizes and hashes of images that a trace only counts (Azure LMM NumImages). Raises ValueError
    naming the file, line and field on malformed input."""
    path = pathlib.Path(path)
    if path.suffix == ".jsonl":
        requests = _read_jsonl(path)
    elif path.suffix == ".csv":
        requests = _read_csv(path, image_spec)
    else:
        raise ValueError(f"{path}: unknown trace format (expected .csv (Azure, BurstGPT, Vidur) or .jsonl (Mooncake))")
    if not requests:
        raise ValueError(f"{path}: empty trace (no requests)")
    return requests


def write_trace(path: str | pathlib.Path, requests: Iterable[TraceRequest]) -> None:
    """Write canonical JSONL in arrival order, timestamps in whole ms since the first request; empty
    optional fields are left out, so text-only traces stay plain Mooncake."""
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    if not ordered:
        raise ValueError(f"{path}: nothing to write (empty trace)")
    t0 = ordered[0].arrival_s
    with open(path, "w") as f:
        for request in ordered:
            f.write(json.dumps(_canonical_record(request, t0)) + "\n")


def _canonical_record(request: TraceRequest, t0: float) -> dict[str, Any]:
    record: dict[str, Any] = {
        "timestamp": round((request.arrival_s - t0) * 1000),
        "input_length": request.context_tokens,
        "output_length": request.generated_tokens,
        "hash_ids": list(request.prefix_blocks),
    }
    if request.session_id:
        record["session_id"] = request.session_id
    if request.delay_s:
        record["delay_ms"] = round(request.delay_s * 1000)
    if request.images:
        record["images"] = [dataclasses.asdict(image) for image in request.images]
    return record


# --- JSONL (Mooncake / canonical) ----------------------------------------------------------------

def _read_jsonl(path: pathlib.Path) -> list[TraceRequest]:
    rows = [(f"{path}:{number}", _json_object(line, f"{path}:{number}"))
            for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not rows:
        return []
    times_ms = _timestamps_ms(rows)
    t0 = min(times_ms)
    requests = [_jsonl_request(record, where, (t - t0) / 1000.0) for (where, record), t in zip(rows, times_ms)]
    return sorted(requests, key=lambda r: r.arrival_s)


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _timestamps_ms(rows: Sequence[tuple[str, dict[str, Any]]]) -> list[float]:
    """Each row's timestamp; a follow-up turn without one arrives its delay after its session's
    previous turn (open-loop approximation of Dynamo's "delay after the previous turn completes")."""
    last_in_session: dict[str, float] = {}
    times = []
    for where, record in rows:
        session = str(record.get("session_id", ""))
        if "timestamp" in record or not session or session not in last_in_session:
            time = _number(record, "timestamp", where)
        else:
            time = last_in_session[session] + _delay_ms(record, where)
        if session:
            last_in_session[session] = time
        times.append(time)
    return times


def _jsonl_request(record: dict[str, Any], where: str, arrival_s: float) -> TraceRequest:
    blocks = record.get("hash_ids", [])
    if not isinstance(blocks, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
        raise ValueError(f"{where}: field 'hash_ids' must be a list of integers")
    images = record.get("images", [])
    if not isinstance(images, list):
        raise ValueError(f"{where}: field 'images' must be a list")
    return TraceRequest(
        arrival_s=arrival_s,
        context_tokens=_count(record, "input_length", where),
        generated_tokens=_count(record, "output_length", where),
        prefix_blocks=tuple(blocks),
        images=tuple(_image(item, f"{where}: images[{k}]") for k, item in enumerate(images)),
        session_id=str(record.get("session_id", "")),
        delay_s=_delay_ms(record, where) / 1000.0,
    )


def _image(item: Any, where: str) -> TraceImage:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object with hash, width, height")
    if not isinstance(item.get("hash"), (str, int)):
        raise ValueError(f"{where}: missing field 'hash' (a string)")
    width, height = _count(item, "width", where), _count(item, "height", where)
    if width == 0 or height == 0:
        raise ValueError(f"{where}: width and height must be > 0")
    return TraceImage(hash=str(item["hash"]), width=width, height=height)


def _delay_ms(record: dict[str, Any], where: str) -> float:
    key = "delay_ms" if "delay_ms" in record else "delay"
    return _number(record, key, where) if key in record else 0.0


def _number(record: dict[str, Any], key: str, where: str) -> float:
    if key not in record:
        raise ValueError(f"{where}: missing field {key!r}")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: field {key!r} must be a number, got {value!r}")
    if value < 0:
        raise ValueError(f"{where}: field {key!r} must be >= 0, got {value!r}")
    return value


def _count(record: dict[str, Any], key: str, where: str) -> int:
    value = _number(record, key, where)
    if not float(value).is_integer():
        raise ValueError(f"{where}: field {key!r} must be a whole number, got {value!r}")
    return int(value)


# --- CSV (Azure, Azure LMM, BurstGPT, Vidur) -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _CsvFormat:
    name: str
    time: str                     # arrival column
    context: str                  # prompt tokens column
    generated: str                # output tokens column
    parse_time: Callable[[str], float] = float  # column text -> seconds
    images: str = ""              # optional image-count column


def _parse_time(text: str) -> float:
    text = text.strip().replace("Z", "+00:00")
    if "." in text:  # Azure writes 7 fractional digits; datetime takes at most 6
        head, frac = text.split(".", 1)
        digits = "".join(ch for ch in frac if ch.isdigit())
        tz = frac[len(digits):]
        text = f"{head}.{digits[:6]}{tz}"
    return datetime.datetime.fromisoformat(text).timestamp()


_CSV_FORMATS = (
    _CsvFormat("Azure", "TIMESTAMP", "ContextTokens", "GeneratedTokens", _parse_time, images="NumImages"),
    _CsvFormat("BurstGPT", "Timestamp", "Request tokens", "Response tokens"),
    _CsvFormat("Vidur", "arrived_at", "num_prefill_tokens", "num_decode_tokens"),
)


def _read_csv(path: pathlib.Path, image_spec: SynthSpec | None) -> list[TraceRequest]:
    """Azure LMM assumption: ContextTokens is taken as text tokens (the trace does not say whether
    image tokens are included), so a simulator adds image tokens on top: conservative for prefill.
    NumImages becomes images with sizes and hashes drawn by `image_spec` (see synth.images_for_counts)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            return []
        form = _csv_format(path, reader.fieldnames)
        rows = [_csv_row(form, row, f"{path}:{reader.line_num}") for row in reader]
    rows.sort(key=lambda row: row[0])
    if not rows:
        return []
    t0 = rows[0][0]
    images = _drawn_images([row[3] for row in rows], image_spec)
    return [TraceRequest(arrival_s=t - t0, context_tokens=context, generated_tokens=generated, images=drawn)
            for (t, context, generated, _), drawn in zip(rows, images)]


def _csv_format(path: pathlib.Path, header: Sequence[str]) -> _CsvFormat:
    for form in _CSV_FORMATS:
        if {form.time, form.context, form.generated} <= set(header):
            return form if form.images in header else dataclasses.replace(form, images="")
    expected = "; ".join(f"{f.name}: {f.time}, {f.context}, {f.generated}" for f in _CSV_FORMATS)
    raise ValueError(f"{path}: unknown CSV columns {list(header)} (expected {expected})")


def _csv_row(form: _CsvFormat, row: dict[str, str], where: str) -> tuple[float, int, int, int]:
    try:
        time = form.parse_time(row[form.time])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: column {form.time!r}: cannot read time {row[form.time]!r}") from None
    return (time, _csv_count(row, form.context, where), _csv_count(row, form.generated, where),
            _csv_count(row, form.images, where) if form.images else 0)


def _csv_count(row: dict[str, str], column: str, where: str) -> int:
    text = (row.get(column) or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: column {column!r}: {text!r} is not a number") from None
    if not value.is_integer() or value < 0:
        raise ValueError(f"{where}: column {column!r}: {text!r} is not a whole number >= 0")
    return int(value)


def _drawn_images(counts: list[int], image_spec: SynthSpec | None) -> list[tuple[TraceImage, ...]]:
    if not any(counts):
        return [()] * len(counts)
    from tuner.synth import SynthSpec, images_for_counts

    return images_for_counts(counts, image_spec or SynthSpec())


# --- summaries -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TraceStats:
    requests: int
    duration_s: float
    mean_rate_rps: float
    context_tokens: dict[str, float]     # p50 / p90 / p99 / mean
    generated_tokens: dict[str, float]
    images_per_request: dict[str, float]
    prefix_reuse: float | None            # fraction of prefix blocks seen before (None: no hash_ids)
    image_reuse: float | None             # fraction of images whose hash was seen before (None: no images)


def summarize(requests: Sequence[TraceRequest]) -> TraceStats:
    if not requests:
        raise ValueError("empty trace")
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    duration = ordered[-1].arrival_s - ordered[0].arrival_s
    return TraceStats(
        requests=len(ordered),
        duration_s=duration,
        mean_rate_rps=len(ordered) / duration if duration > 0 else math.inf,
        context_tokens=_quantiles([r.context_tokens for r in ordered]),
        generated_tokens=_quantiles([r.generated_tokens for r in ordered]),
        images_per_request=_quantiles([r.num_images for r in ordered]),
        prefix_reuse=_reuse([r.prefix_blocks for r in ordered]),
        image_reuse=_reuse([tuple(image.hash for image in r.images) for r in ordered]),
    )


def _quantiles(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": sum(ordered) / len(ordered)}


def _reuse(keys_per_request: Sequence[tuple]) -> float | None:
    """Fraction of keys (prefix blocks or image hashes), in arrival order, already seen before
    (cacheable with an unbounded cache); None when the trace has none."""
    total = sum(len(keys) for keys in keys_per_request)
    if total == 0:
        return None
    seen: set = set()
    reused = 0
    for keys in keys_per_request:
        for key in keys:
            reused += key in seen
            seen.add(key)
    return reused / total
