"""Synthetic multimodal workload traces (deterministic), images for traces that only count them, and
time rescaling.

  spec = parse_spec("rate=4,requests=1000,images=0.6,reuse=0.2,arrivals=bursty")
  trace = synthesize(spec)           # list[TraceRequest]; the same spec always gives the same trace
  trace = rescale(trace, 8.0)        # same requests, arrivals compressed to a mean 8 req/s
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tuner.traces import MOONCAKE_BLOCK_TOKENS, TraceImage, TraceRequest

ARRIVALS = ("poisson", "bursty")


@dataclasses.dataclass(frozen=True)
class ImageSize:
    width: int
    height: int
    weight: float = 1.0  # relative frequency among new images


COMMON_SIZES = (
    ImageSize(1280, 720, 0.30),   # HD screenshot, video frame
    ImageSize(1920, 1080, 0.15),  # full-HD screenshot
    ImageSize(1024, 1024, 0.15),  # square (generated images, crops)
    ImageSize(800, 600, 0.10),
    ImageSize(640, 480, 0.15),    # small photo, thumbnail
    ImageSize(3024, 4032, 0.15),  # phone photo, portrait
)


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    requests: int = 1000
    rate_rps: float = 4.0              # mean arrival rate
    arrivals: str = "poisson"          # "poisson" | "bursty" (Gamma inter-arrival gaps)
    burstiness: float = 3.0            # bursty: coefficient of variation of the gaps (1 = Poisson)
    text_median: int = 800             # text tokens of a new message: log-normal median,
    text_sigma: float = 1.0            # sigma of the log,
    text_min: int = 16                 # clipped to [text_min, text_max]
    text_max: int = 16384
    output_median: int = 150           # output tokens, likewise
    output_sigma: float = 0.8
    output_min: int = 1
    output_max: int = 4096
    image_fraction: float = 0.5        # share of messages that carry images
    images_mean: float = 1.5           # mean images on those (geometric, >= 1),
    max_images: int = 8                # capped,
    min_images: int = 1                # and floored (an image-heavy workload: min_images=4)
    sizes: tuple[ImageSize, ...] = COMMON_SIZES  # sizes of new images, by weight
    image_reuse: float = 0.2           # P(an image repeats one already seen)
    image_zipf: float = 1.0            # popularity of seen images: P(k-th distinct image) ~ k^-image_zipf
    prefix_share: float = 0.3          # share of conversations that open with a shared system prompt
    system_prompts: int = 4            # distinct shared system prompts,
    system_blocks: int = 2             # each this many 512-token blocks long
    session_turns: float = 1.0         # mean turns per conversation (geometric; 1 = single-turn); with
                                       # turns the rate ramps up over the first think times (rescale pins it)
    think_time_s: float = 30.0         # mean gap between turns of a conversation (exponential)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, (accepts, expected) in _RULES.items():
            if not accepts(getattr(self, name)):
                raise ValueError(f"synthetic spec: {name}={getattr(self, name)!r}: expected {expected}")
        for low, high in (("text_min", "text_max"), ("output_min", "output_max"), ("min_images", "max_images")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"synthetic spec: {low} must be <= {high}")


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: math.isfinite(v) and v >= low), f"a number >= {low:g}"


_FRACTION = ((lambda v: 0.0 <= v <= 1.0), "a fraction in [0, 1]")
_POSITIVE = ((lambda v: math.isfinite(v) and v > 0), "a number > 0")
_SIZES_TEXT = "WxH[:weight] sizes joined by '|', e.g. 1280x720:3|640x480:1"
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "requests": _at_least(1), "rate_rps": _POSITIVE,
    "arrivals": ((lambda v: v in ARRIVALS), "one of " + ", ".join(ARRIVALS)), "burstiness": _POSITIVE,
    "text_median": _at_least(1), "text_sigma": _at_least(0), "text_min": _at_least(0), "text_max": _at_least(1),
    "output_median": _at_least(1), "output_sigma": _at_least(0), "output_min": _at_least(1),
    "output_max": _at_least(1), "image_fraction": _FRACTION, "images_mean": _at_least(1),
    "max_images": _at_least(1), "min_images": _at_least(1),
    "sizes": ((lambda v: bool(v) and all(s.width > 0 and s.height > 0 and s.weight > 0 for s in v)), _SIZES_TEXT),
    "image_reuse": _FRACTION, "image_zipf": _at_least(0), "prefix_share": _FRACTION,
    "system_prompts": _at_least(1), "system_blocks": _at_least(1), "session_turns": _at_least(1),
    "think_time_s": _at_least(0), "seed": _at_least(0),
}
ALIASES = {"rate": "rate_rps", "images": "image_fraction", "reuse": "image_reuse", "turns": "session_turns",
           "prefix": "prefix_share", "think": "think_time_s"}


# --- the spec string -------------------------------------------------------------------------------

def parse_spec(text: str, base: SynthSpec | None = None) -> SynthSpec:
    """`"rate=4,requests=1000,images=0.6,reuse=0.2,arrivals=bursty"` -> SynthSpec, unset keys from
    `base`. Keys: the short aliases (rate, images, reuse, turns, prefix, think) or any field name.
    Raises ValueError naming the key and what it accepts."""
    changes: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = (piece.strip() for piece in item.partition("="))
        name = ALIASES.get(key, key)
        if name not in _RULES:
            raise ValueError(f"synthetic spec: unknown key {key!r} (accepted: {_accepted_keys()})")
        if not sep:
            raise ValueError(f"synthetic spec: {key!r} needs a value ({key}=...)")
        changes[name] = _spec_value(key, name, value)
    return dataclasses.replace(base or SynthSpec(), **changes)


def _accepted_keys() -> str:
    aliases = [f"{alias} (= {name})" for alias, name in ALIASES.items()]
    return ", ".join(aliases + [name for name in _RULES if name not in ALIASES.values()])


def _spec_value(key: str, name: str, text: str) -> Any:
    accepts, expected = _RULES[name]
    kind = type(getattr(SynthSpec(), name))
    try:
        value = _parse_sizes(text) if kind is tuple else kind(text)
    except ValueError:
        value = None
    if value is None or not accepts(value):
        raise ValueError(f"synthetic spec: {key}={text!r}: expected {expected}")
    return value


def _parse_sizes(text: str) -> tuple[ImageSize, ...]:
    sizes = []
    for item in text.split("|"):
        dims, _, weight = item.partition(":")
        width, _, height = dims.lower().partition("x")
        sizes.append(ImageSize(int(width), int(height), float(weight or 1.0)))
    return tuple(sizes)


# --- the generator -----------------------------------------------------------------------------------

def synthesize(spec: SynthSpec) -> list[TraceRequest]:
    """A synthetic multimodal trace in arrival order, pure and reproducible.

    Invariant: every random number comes from one `default_rng(spec.seed)`, drawn in a fixed order
    (schedule; then lengths, image counts and system-prompt choices for all requests; then images,
    request by request), so equal specs give equal traces. Arrivals are whole milliseconds, so a
    trace survives `write_trace` -> `read_trace` unchanged.

    A follow-up turn re-sends its conversation: its prompt is the previous prompt and answer plus a
    new message, its hash_ids keep the previous prompt's full blocks, and its images are the earlier
    ones (encoder-cache hits) plus new ones.
    """
    rng = np.random.default_rng(spec.seed)
    schedule = _schedule(spec, rng)
    n = len(schedule.arrival_ms)
    text = _lognormal(rng, n, spec.text_median, spec.text_sigma, spec.text_min, spec.text_max)
    output = _lognormal(rng, n, spec.output_median, spec.output_sigma, spec.output_min, spec.output_max)
    image_counts = _image_counts(rng, spec, n)
    system_prompt = np.where(rng.random(n) < spec.prefix_share, rng.integers(spec.system_prompts, size=n), -1)
    picker, blocks = ImagePicker(spec, rng), _BlockIds(spec)
    latest: dict[int, TraceRequest] = {}  # conversation -> its latest turn
    requests = []
    for i in range(n):
        session = int(schedule.session[i])
        prior = latest.get(session)
        tokens = int(text[i]) + (prior.context_tokens + prior.generated_tokens if prior else 0)
        request = TraceRequest(
            arrival_s=int(schedule.arrival_ms[i]) / 1000.0,
            context_tokens=tokens,
            generated_tokens=int(output[i]),
            prefix_blocks=blocks.following(prior, tokens) if prior else blocks.opening(tokens, int(system_prompt[i])),
            images=(prior.images if prior else ()) + picker.pick(int(image_counts[i])),
            session_id=f"s-{session}" if spec.session_turns > 1 else "",
            delay_s=int(schedule.delay_ms[i]) / 1000.0,
        )
        latest[session] = request
        requests.append(request)
    return requests


@dataclasses.dataclass(frozen=True)
class _Schedule:
    arrival_ms: np.ndarray  # whole ms, non-decreasing
    session: np.ndarray     # conversation index of each request
    delay_ms: np.ndarray    # think time before a follow-up turn (0 for an opening turn)


def _schedule(spec: SynthSpec, rng: np.random.Generator) -> _Schedule:
    """Conversations open at rate_rps / session_turns (so turns arrive at rate_rps once the first
    conversations have warmed up); each has geometric turns spaced by exponential think times.
    Opening `requests` conversations is enough: their opening turns alone are `requests` arrivals no
    later than the last opening, so no unopened conversation could place a turn among the first
    `requests`."""
    count = spec.requests
    starts_ms = _to_ms(_arrival_times(rng, count, spec.rate_rps / spec.session_turns, spec))
    turns = rng.geometric(1.0 / spec.session_turns, size=count)
    session = np.repeat(np.arange(count), turns)
    first = np.cumsum(turns) - turns
    gaps_ms = _to_ms(rng.exponential(spec.think_time_s, size=session.size))
    gaps_ms[first] = 0
    elapsed = np.cumsum(gaps_ms)
    elapsed -= np.repeat(elapsed[first], turns)
    arrival_ms = starts_ms[session] + elapsed
    order = np.argsort(arrival_ms, kind="stable")[:count]
    return _Schedule(arrival_ms[order], session[order], gaps_ms[order])


def _arrival_times(rng: np.random.Generator, count: int, rate: float, spec: SynthSpec) -> np.ndarray:
    """`count` arrival times in seconds from 0, mean gap 1/rate: exponential gaps (poisson), or Gamma
    gaps with coefficient of variation `burstiness` (shape 1/cv², scale keeping the mean)."""
    if spec.arrivals == "poisson":
        gaps = rng.exponential(1.0 / rate, size=count - 1)
    else:
        shape = 1.0 / spec.burstiness**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=count - 1)
    return np.concatenate(([0.0], np.cumsum(gaps)))


def _to_ms(seconds: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(seconds) * 1000.0).astype(np.int64)


def _lognormal(rng: np.random.Generator, n: int, median: float, sigma: float, low: int, high: int) -> np.ndarray:
    return np.clip(np.rint(median * np.exp(sigma * rng.standard_normal(n))), low, high).astype(np.int64)


def _image_counts(rng: np.random.Generator, spec: SynthSpec, n: int) -> np.ndarray:
    with_images = rng.random(n) < spec.image_fraction
    counts = np.clip(rng.geometric(1.0 / spec.images_mean, size=n), spec.min_images, spec.max_images)
    return np.where(with_images, counts, 0)


class _BlockIds:
    """Mooncake-style hash_ids of 512-token blocks: ids below system_prompts * system_blocks are the
    shared system prompts; every other block gets a fresh id (a block's id stands for its whole prefix)."""

    def __init__(self, spec: SynthSpec) -> None:
        self._system_blocks = spec.system_blocks
        self._next = spec.system_prompts * spec.system_blocks

    def opening(self, tokens: int, system_prompt: int) -> tuple[int, ...]:
        """A conversation's first prompt; system_prompt -1 = none, else its full blocks are shared."""
        shared = 0 if system_prompt < 0 else min(self._system_blocks, tokens // MOONCAKE_BLOCK_TOKENS)
        start = max(system_prompt, 0) * self._system_blocks
        return tuple(range(start, start + shared)) + self._fresh(_blocks(tokens) - shared)

    def following(self, prior: TraceRequest, tokens: int) -> tuple[int, ...]:
        """A follow-up prompt: the previous prompt's full blocks, then fresh ones."""
        kept = prior.prefix_blocks[: prior.context_tokens // MOONCAKE_BLOCK_TOKENS]
        return kept + self._fresh(_blocks(tokens) - len(kept))

    def _fresh(self, count: int) -> tuple[int, ...]:
        ids = tuple(range(self._next, self._next + count))
        self._next += count
        return ids


def _blocks(tokens: int) -> int:
    return -(-tokens // MOONCAKE_BLOCK_TOKENS)


# --- images ----------------------------------------------------------------------------------------

class ImagePicker:
    """Draws request images. Each image repeats an already seen one with probability `image_reuse`
    (the k-th distinct image with weight ~ k^-image_zipf), else is new: a size drawn from `sizes` and
    a fresh 16-hex-digit hash. Mutates its list of seen images; one picker per trace."""

    def __init__(self, spec: SynthSpec, rng: np.random.Generator) -> None:
        self._spec, self._rng = spec, rng
        weights = np.array([size.weight for size in spec.sizes], dtype=float)
        self._size_weights = weights / weights.sum()
        self._seen: list[TraceImage] = []

    def pick(self, count: int) -> tuple[TraceImage, ...]:
        return tuple(self._one() for _ in range(count))

    def _one(self) -> TraceImage:
        if self._seen and self._rng.random() < self._spec.image_reuse:
            return self._seen[_zipf_index(self._rng, len(self._seen), self._spec.image_zipf)]
        size = self._spec.sizes[int(self._rng.choice(len(self._spec.sizes), p=self._size_weights))]
        image = TraceImage(f"{int(self._rng.integers(1 << 63)):016x}", size.width, size.height)
        self._seen.append(image)
        return image


def _zipf_index(rng: np.random.Generator, n: int, exponent: float) -> int:
    """An index in [0, n) with P(k) ~ (k+1)^-exponent, by inverting the continuous power law on [1, n+1)."""
    u = rng.random()
    if abs(exponent - 1.0) < 1e-9:
        x = (n + 1) ** u
    else:
        x = (1 + u * ((n + 1) ** (1 - exponent) - 1)) ** (1 / (1 - exponent))
    return min(n, int(x)) - 1


def images_for_counts(counts: Sequence[int], spec: SynthSpec) -> list[tuple[TraceImage, ...]]:
    """Images for requests (in arrival order) that only say how many they carry (Azure LMM
    NumImages): sizes, hashes and reuse from `spec`, seeded by spec.seed."""
    picker = ImagePicker(spec, np.random.default_rng(spec.seed))
    return [picker.pick(int(count)) for count in counts]


def add_images(requests: Sequence[TraceRequest], spec: SynthSpec) -> list[TraceRequest]:
    """A text-only trace made multimodal: requests without images get images per `spec` (share,
    count, sizes, reuse), seeded by spec.seed; requests that have images keep them. Arrival order."""
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    rng = np.random.default_rng(spec.seed)
    counts = _image_counts(rng, spec, len(ordered))
    picker = ImagePicker(spec, rng)
    return [r if r.images else dataclasses.replace(r, images=picker.pick(int(c))) for r, c in zip(ordered, counts)]


# --- time scaling ----------------------------------------------------------------------------------

def rescale(requests: Sequence[TraceRequest], rate_rps: float) -> list[TraceRequest]:
    """The same requests in arrival order, times (arrivals and follow-up delays) multiplied by one
    factor so the mean rate, requests / (last arrival - first) as `summarize` measures it, is
    `rate_rps`. The first request arrives at 0."""
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    if not math.isfinite(rate_rps) or rate_rps <= 0:
        raise ValueError(f"rescale: rate_rps must be > 0, got {rate_rps!r}")
    span = ordered[-1].arrival_s - ordered[0].arrival_s if ordered else 0.0
    if span <= 0:
        raise ValueError("rescale: needs at least two requests at different times")
    factor = len(ordered) / rate_rps / span
    t0 = ordered[0].arrival_s
    return [dataclasses.replace(r, arrival_s=(r.arrival_s - t0) * factor, delay_s=r.delay_s * factor)
            for r in ordered]
