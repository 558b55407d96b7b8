"""Requests against a live router, timed as a client sees them, and trace replay.

`replay` sends a trace open-loop (each request at its arrival time, whatever the earlier ones are
doing) and records client-side TTFT (first chunk), TPOT and e2e. A trace request becomes a real
request: its prefix block hashes become shared text (equal hashes -> equal text, so the prefill
prefix cache sees the reuse the trace has), the rest of its text tokens are unique, and each image
hash becomes a deterministic picture of the trace's size (equal hashes -> equal bytes, so the
embedding cache sees the trace's image reuse).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import math
import os
import random
import time
from collections.abc import Callable, Sequence

from tuner.traces import TraceImage, TraceRequest

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo")
TRACE_BLOCK_TOKENS = 512


@dataclasses.dataclass
class Measured:
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    tpot_s: float = math.nan
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str = ""


async def timed_generate(client, prompt: str, images: Sequence[bytes] = (), *, max_tokens: int,
                         **params) -> Measured:
    """One request (`params`: more of the client's generation parameters, e.g. fastkv=True); times
    are client-side (first chunk, last event)."""
    start = time.perf_counter()
    first = None
    stream = client.stream(prompt, images=list(images), max_tokens=max_tokens, ignore_eos=True, **params)
    async for _ in stream:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    result = stream.result
    completion = result.usage.completion_tokens
    ttft = (first or end) - start
    return Measured(ttft, end - start, (end - first) / (completion - 1) if first and completion > 1 else math.nan,
                    result.usage.prompt_tokens, completion, dict(result.timings_ms))


def random_png(width: int, height: int, rng: random.Random) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class PromptMaker:
    """Text of about N tokens for a live deployment (calibrated: tokens per character of this
    text on its tokenizer), with shared blocks for equal prefix hashes and equal pictures for equal
    image hashes. Blocks and pictures are salted per PromptMaker (random by default), so a replay
    starts with cold caches, as the simulation does, even against a deployment that served the
    same trace before."""

    def __init__(self, chars_per_token: float = 1.0, seed: int = 0, salt: str | None = None) -> None:
        self.chars_per_token = chars_per_token
        self.rng = random.Random(seed)
        self.salt = salt if salt is not None else os.urandom(8).hex()
        self._images: dict[str, bytes] = {}

    async def calibrate(self, client) -> None:
        long = await client.generate(self.text(400), max_tokens=1)
        short = await client.generate(self.text(0), max_tokens=1)
        self.chars_per_token = 400 / max(1, long.usage.prompt_tokens - short.usage.prompt_tokens)

    def text(self, chars: int, rng: random.Random | None = None) -> str:
        rng = rng or self.rng
        words = [f"{rng.getrandbits(40):x}"]  # a unique first word: no accidental prefix reuse
        while sum(len(w) + 1 for w in words) < chars:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    def prompt(self, tokens: int) -> str:
        return self.text(int(tokens * self.chars_per_token))

    def for_trace(self, request: TraceRequest) -> str:
        chars = int(request.context_tokens * self.chars_per_token)
        block_chars = int(TRACE_BLOCK_TOKENS * self.chars_per_token)
        shared = "".join(self.text(block_chars, random.Random(f"{self.salt}-block-{b}")) + " "
                         for b in request.prefix_blocks)
        if len(shared) >= chars:
            return shared[:chars]
        return shared + self.text(chars - len(shared))

    def image(self, image: TraceImage) -> bytes:
        if image.hash not in self._images:
            rng = random.Random(f"{self.salt}-image-{image.hash}")
            self._images[image.hash] = random_png(image.width, image.height, rng)
        return self._images[image.hash]


async def replay(client, requests: Sequence[TraceRequest], prompts: PromptMaker, *,
                 progress: Callable[[int], None] = lambda _: None) -> list[Measured]:
    """Send every request at its arrival time (open loop); results in trace order."""
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    payloads = [(prompts.for_trace(r), [prompts.image(i) for i in r.images]) for r in ordered]
    start = time.perf_counter()

    async def one(request: TraceRequest, prompt: str, images: list[bytes]) -> Measured:
        await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
        try:
            measured = await timed_generate(client, prompt, images, max_tokens=max(1, request.generated_tokens))
        except Exception as exc:  # a failed request is a result, not the end of the replay
            measured = Measured(error=f"{type(exc).__name__}: {exc}")
        progress(1)
        return measured

    return list(await asyncio.gather(*(one(r, p, i) for r, (p, i) in zip(ordered, payloads))))


async def warm_up(client, requests: Sequence[TraceRequest], prompts: PromptMaker, count: int = 30) -> None:
    """Serve `count` requests shaped like the trace's first ones, 20 per second, and discard them:
    a fresh deployment pays one-time costs (lazy initialisation, kernels for new shapes) on its
    first requests. A different salt keeps the measured replay's caches cold."""
    if count <= 0:
        return
    ordered = sorted(requests, key=lambda r: r.arrival_s)[:count]
    shaped = [dataclasses.replace(r, arrival_s=i * 0.05) for i, r in enumerate(ordered)]
    other = PromptMaker(prompts.chars_per_token, salt=prompts.salt + "-warm-up")
    await replay(client, shaped, other)
