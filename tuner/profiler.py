"""`tuner profile`: sweep a running deployment through its router and fit a `Profile`.

Every request's `Complete.timings_ms` carries each stage's own clock (encode tower and batch
wait, prefill compute, decode steps and mean batch), so one front-door address is enough to
separate what occupies a replica (fitted as service time) from what only delays a request (RPC,
cache and hand-off overheads). Sweeps, in order: prefill (prompt lengths, uncached then fully
cached), the same lengths with FastKV at the deployment's rates (skipped when the model refuses
it), encode (images per request x image size, then the same images again as cache hits), decode
(concurrent streams x prompt length). Prompts start with a random word so that no run
hits another's prefix cache unless the sweep means it to. On a shared host (a local deployment,
`Deployment.host_cores`), the CPU its processes use while no request runs is measured first, from
the host's counters, and charged per process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import pathlib
import random
import statistics
import time
from collections.abc import Callable, Sequence

from epdserve.errors import InvalidArgumentError
from tuner.live import Measured, PromptMaker, random_png, timed_generate
from tuner.profile import DecodeProfile, EncodeProfile, Fit, PrefillProfile, Profile, constant, fit_linear

PROC_STAT = pathlib.Path("/proc/stat")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    prompt_tokens: tuple[int, ...] = (32, 128, 384, 768, 1280)
    images: tuple[int, ...] = (1, 2, 4, 8)
    image_sides: tuple[int, ...] = (64, 512)           # square images, pixels per side
    decode_concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    decode_prompt_tokens: tuple[int, ...] = (64, 512)
    decode_output_tokens: int = 48
    repeats: int = 3
    idle_s: float = 0.25   # mean pause before each measurement: a replica serving a trace is not busy back
    seed: int = 0          # to back, and an idle one answers slower (cold caches, thread and vCPU wake-ups)
    idle_window_s: float = 5.0  # shared host: seconds without requests over which the idle CPU is measured


@dataclasses.dataclass(frozen=True)
class Deployment:
    """What the router cannot report about the profiled deployment (its flags)."""
    prefix_block_tokens: int = 32      # prefill --prefix-block-tokens (0: prefix cache off)
    max_running: int = 64              # decode --max-running
    kv_capacity_tokens: int = 1 << 20  # decode KV rows (blocks x block size)
    host_cores: int = 0                # > 0: all replicas share this many CPU cores (a local deployment)
    measured_on: str = ""
    processes: int = 0                 # shared host: its service processes, router included (> 0: their idle
                                       # CPU is measured)


@dataclasses.dataclass
class Sample:
    images: int
    megapixels: float
    concurrency: int
    measured: Measured
    run: int = 0       # decode sweep: the concurrent run this stream was one of (its streams share their steps)

    @property
    def prompt_tokens(self) -> int:
        return self.measured.prompt_tokens

    @property
    def timings(self) -> dict[str, float]:
        return self.measured.timings


class Profiler:
    def __init__(self, client, sweep: SweepConfig, *, progress: Callable[[str], None] = lambda _: None) -> None:
        self.client, self.sweep, self.progress = client, sweep, progress
        self.rng = random.Random(sweep.seed)
        self.prompts = PromptMaker(seed=sweep.seed)

    async def run(self, deployment: Deployment) -> Profile:
        info = await self.client.model_info()
        await self.prompts.calibrate(self.client)
        limit = info.max_context // 2
        await self._warm_up(limit)
        idle = await self._idle_cores_per_process(deployment)
        lengths = [t for t in self.sweep.prompt_tokens if t <= limit]
        prefill = await self._prefill_sweep(lengths)
        fastkv = await self._fastkv_sweep(lengths)
        encode = await self._encode_sweep()
        decode = await self._decode_sweep([t for t in self.sweep.decode_prompt_tokens if t <= limit])
        return build_profile(info, prefill, encode, decode, deployment, fastkv, idle)

    async def _warm_up(self, limit: int) -> None:
        """First calls pay one-time costs (lazy initialisation, allocator growth): not measured."""
        self.progress("warm-up")
        for side in self.sweep.image_sides:
            for count in (1, max(self.sweep.images)):
                images = [random_png(side, side, self.rng) for _ in range(count)]
                await timed_generate(self.client, self.prompts.prompt(16), images, max_tokens=4)
        for tokens in self.sweep.prompt_tokens:
            if tokens <= limit:
                await timed_generate(self.client, self.prompts.prompt(tokens), max_tokens=4)

    async def _idle_cores_per_process(self, deployment: Deployment) -> float:
        if deployment.host_cores <= 0 or deployment.processes <= 0:
            return 0.0
        if not PROC_STAT.exists():
            self.progress("idle CPU not measured: no /proc/stat on this host")
            return 0.0
        self.progress(f"idle CPU of {deployment.processes} service processes ({self.sweep.idle_window_s:g} s)")
        return await idle_host_cores(self.sweep.idle_window_s) / deployment.processes

    async def _pause(self) -> None:
        await asyncio.sleep(self.sweep.idle_s * self.rng.uniform(0.5, 1.5))

    async def _one(self, prompt: str, images: Sequence[bytes] = (), sides: Sequence[int] = (), *,
                   max_tokens: int = 1, concurrency: int = 1, run: int = 0, **params) -> Sample:
        if concurrency == 1:
            await self._pause()
        measured = await timed_generate(self.client, prompt, images, max_tokens=max_tokens, **params)
        return Sample(len(images), sum(s * s for s in sides) / 1e6, concurrency, measured, run)

    async def _prefill_sweep(self, lengths: Sequence[int]) -> list[Sample]:
        samples = []
        for tokens in lengths:
            self.progress(f"prefill: {tokens} prompt tokens")
            for _ in range(self.sweep.repeats):
                prompt = self.prompts.prompt(tokens)
                samples.append(await self._one(prompt))
                samples.append(await self._one(prompt))  # again: its full blocks now come from the prefix cache
        return samples

    async def _fastkv_sweep(self, lengths: Sequence[int]) -> list[Sample]:
        """Prefill with FastKV (lossy; never reads or fills the prefix cache) at the rates the
        deployment runs it with. Empty when the model refuses FastKV (sliding-window attention)."""
        samples = []
        for tokens in lengths:
            self.progress(f"prefill with FastKV: {tokens} prompt tokens")
            for _ in range(self.sweep.repeats):
                try:
                    samples.append(await self._one(self.prompts.prompt(tokens), fastkv=True))
                except InvalidArgumentError as exc:
                    self.progress(f"FastKV skipped: {exc.message}")
                    return []
        return samples

    async def _encode_sweep(self) -> list[Sample]:
        samples = []
        for side in self.sweep.image_sides:
            for count in self.sweep.images:
                self.progress(f"encode: {count} x {side}px images")
                for _ in range(self.sweep.repeats):
                    images = [random_png(side, side, self.rng) for _ in range(count)]
                    samples.append(await self._one(self.prompts.prompt(16), images, [side] * count))
                    samples.append(await self._one(self.prompts.prompt(16), images, [side] * count))  # cache hits
        return samples

    async def _decode_sweep(self, lengths: Sequence[int]) -> list[Sample]:
        samples = []
        for tokens in lengths:
            for concurrency in self.sweep.decode_concurrency:
                self.progress(f"decode: {concurrency} streams x {tokens} prompt tokens")
                for _ in range(self.sweep.repeats if concurrency == 1 else 1):
                    if concurrency > 1:
                        await self._pause()
                    run = len(samples) + 1
                    runs = [self._one(self.prompts.prompt(tokens), max_tokens=self.sweep.decode_output_tokens,
                                      concurrency=concurrency, run=run) for _ in range(concurrency)]
                    samples.extend(await asyncio.gather(*runs))
        return samples


def host_busy_cpu_s() -> float:
    """CPU seconds this host's processors have been busy since boot (Linux /proc/stat: user, nice,
    system, irq and softirq time; not idle, iowait, or time a hypervisor gave to other guests)."""
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in PROC_STAT.read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


async def idle_host_cores(seconds: float) -> float:
    """Cores the host's other processes kept busy over `seconds` while this one only waited."""
    host, own, start = host_busy_cpu_s(), time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    others = (host_busy_cpu_s() - host) - (time.process_time() - own)
    return max(others, 0.0) / (time.monotonic() - start)


def build_profile(info, prefill: Sequence[Sample], encode: Sequence[Sample], decode: Sequence[Sample],
                  deployment: Deployment, fastkv: Sequence[Sample] = (),
                  idle_cores_per_process: float = 0.0) -> Profile:
    alone = [s for s in (*prefill, *encode, *decode) if s.concurrency == 1]
    decoded = [s for s in decode if s.timings.get("decode.decode_steps", 0) > 1]
    return Profile(
        model=f"{info.model}@{info.revision}",
        max_context=info.max_context,
        router_ms=fit_linear([_router_row(s) for s in alone], "ms", ("const", "prompt_tokens", "images", "megapixels")),
        encode=_encode_profile(encode, info.image_tokens_per_image),
        prefill=PrefillProfile(
            compute_ms=fit_linear([_prefill_row(s) for s in alone], "compute_ms",
                                  ("const", "tokens", "tokens_sq", "cached_tokens")),
            call_ms=fit_linear([_prefill_row(s) for s in alone], "call_ms", ("const", "tokens", "images")),
            block_tokens=deployment.prefix_block_tokens,
            fastkv_compute_ms=fit_linear([_prefill_row(s) for s in fastkv], "compute_ms",
                                         ("const", "tokens", "tokens_sq")) if fastkv else None,
            fastkv_kv_fraction=_kv_fraction(fastkv, prefill)),
        decode=DecodeProfile(
            step_ms=fit_linear(_step_rows_per_run(decoded), "ms", ("const", "batch", "context")),
            join_ms=fit_linear([_join_row(s) for s in decoded if s.concurrency == 1], "ms", ("const", "kv_tokens")),
            max_running=deployment.max_running, kv_capacity_tokens=deployment.kv_capacity_tokens),
        measured_on=deployment.measured_on,
        measured_at=datetime.date.today().isoformat(),
        host_cores=deployment.host_cores,
        idle_cores_per_process=idle_cores_per_process,
    )


def _router_row(s: Sample) -> dict[str, float]:
    t = s.timings
    client_ttft_ms = s.measured.ttft_s * 1000.0
    return {"ms": max(client_ttft_ms - t.get("encode_rpc_ms", 0.0) - t["prefill_rpc_ms"], 0.0),
            "prompt_tokens": float(s.prompt_tokens), "images": float(s.images), "megapixels": s.megapixels}


def _prefill_row(s: Sample) -> dict[str, float]:
    t = s.timings
    compute = t["prefill.prefill_ms"] - t.get("prefill.kv_publish_ms", 0.0)
    tokens = t["prefill.computed_tokens"]
    return {"compute_ms": compute, "call_ms": max(t["prefill_rpc_ms"] - compute, 0.0), "tokens": tokens,
            "tokens_sq": tokens * tokens / 1000.0, "cached_tokens": t.get("prefill.prefix_hit_tokens", 0.0),
            "images": float(s.images)}


def _kv_fraction(fastkv: Sequence[Sample], lossless: Sequence[Sample]) -> float:
    """Median KV rows kept by FastKV per prompt row: stored rows (summed over layers) over what the
    lossless prefill stores for a prompt (every row in every layer)."""
    if not fastkv or not lossless:
        return 1.0
    layers = statistics.median(s.timings["prefill.kv_tokens_stored"] / s.prompt_tokens for s in lossless)
    return min(1.0, statistics.median(s.timings["prefill.kv_tokens_stored"] / (layers * s.prompt_tokens)
                                      for s in fastkv))


def _encode_profile(samples: Sequence[Sample], tokens_per_image: int) -> EncodeProfile:
    tower, call, hit = _tower_rows(samples), _encode_call_rows(samples), _hit_rows(samples)
    return EncodeProfile(
        tower_ms=fit_linear(tower, "ms", ("const", "images", "megapixels")) if tower else constant(0.0),
        call_ms=fit_linear(call, "ms", ("const", "images", "megapixels")) if call else constant(0.0),
        hit_call_ms=fit_linear(hit, "ms", ("const", "images")) if hit else constant(0.0),
        tokens_per_image=tokens_per_image)


def _encoded(samples: Sequence[Sample]) -> list[Sample]:
    return [s for s in samples if s.timings.get("encode.images_encoded", 0) > 0]


def _tower_rows(samples: Sequence[Sample]) -> list[dict[str, float]]:
    return [{"ms": s.timings["encode.tower_ms"], "images": float(s.images), "megapixels": s.megapixels}
            for s in _encoded(samples)]


def _encode_call_rows(samples: Sequence[Sample]) -> list[dict[str, float]]:
    return [{"ms": max(s.timings["encode_rpc_ms"] - s.timings["encode.tower_ms"]
                       - s.timings.get("encode.batch_wait_ms", 0.0), 0.0), "images": float(s.images),
             "megapixels": s.megapixels} for s in _encoded(samples)]


def _hit_rows(samples: Sequence[Sample]) -> list[dict[str, float]]:
    return [{"ms": s.timings["encode_rpc_ms"], "images": float(s.images)}
            for s in samples if s.images and s.timings.get("encode.images_cached", 0) == s.images]


def _step_row(s: Sample) -> dict[str, float]:
    t = s.timings
    steps, batch = t["decode.decode_steps"], t["decode.decode_batch_mean"]
    return {"ms": t["decode.decode_ms"] / (steps - 1), "batch": batch,
            "context": batch * (s.prompt_tokens + steps / 2.0)}


def _step_rows_per_run(samples: Sequence[Sample]) -> list[dict[str, float]]:
    """One step row per concurrent run (the median of its streams' rows): a run's streams timed the
    same steps, so counting each would weigh a 16-stream run 16 times against a lone stream's and
    bend the fit away from the small batches a lightly loaded replica runs."""
    runs: dict[int, list[dict[str, float]]] = {}
    for index, s in enumerate(samples):
        runs.setdefault(s.run or -1 - index, []).append(_step_row(s))
    return [{key: statistics.median(row[key] for row in rows) for key in rows[0]} for rows in runs.values()]


def _join_row(s: Sample) -> dict[str, float]:
    t = s.timings
    after_first_ms = (s.measured.e2e_s - s.measured.ttft_s) * 1000.0
    steps = t["decode.decode_steps"]
    decoding_ms = t["decode.decode_ms"] * steps / max(steps - 1, 1)  # decode_ms spans steps - 1 step intervals
    return {"ms": max(after_first_ms - decoding_ms, 0.0), "kv_tokens": float(s.prompt_tokens)}


def component_rows(profile: Profile, samples: Sequence[Sample]):
    """(name, fit, target, rows) of every component `build_profile` fits, with the rows these
    samples give it (fitted on requests alone there; any samples here, e.g. a live replay's)."""
    prefilled = [s for s in samples if "prefill.prefill_ms" in s.timings and "prefill_rpc_ms" in s.timings]
    decoded = [s for s in samples if s.timings.get("decode.decode_steps", 0) > 1]
    prefill_rows = [_prefill_row(s) for s in prefilled]
    return [("router", profile.router_ms, "ms", [_router_row(s) for s in prefilled]),
            ("encode tower", profile.encode.tower_ms, "ms", _tower_rows(samples)),
            ("encode call", profile.encode.call_ms, "ms", _encode_call_rows(samples)),
            ("encode all-hit call", profile.encode.hit_call_ms, "ms", _hit_rows(samples)),
            ("prefill compute", profile.prefill.compute_ms, "compute_ms",
             [{k: v for k, v in row.items() if k != "call_ms"} for row in prefill_rows]),
            ("prefill call", profile.prefill.call_ms, "call_ms",
             [{"call_ms": row["call_ms"], "tokens": row["tokens"], "images": row["images"]} for row in prefill_rows]),
            ("decode step", profile.decode.step_ms, "ms", [_step_row(s) for s in decoded]),
            ("decode join", profile.decode.join_ms, "ms", [_join_row(s) for s in decoded])]


def summary_rows(profile: Profile) -> list[tuple[str, Fit]]:
    """(name, fit) of every fitted curve, for printing."""
    return [("router (ms)", profile.router_ms),
            ("encode tower (ms/batch)", profile.encode.tower_ms),
            ("encode call overhead (ms)", profile.encode.call_ms),
            ("encode all-hit call (ms)", profile.encode.hit_call_ms),
            ("prefill compute (ms)", profile.prefill.compute_ms),
            ("prefill call overhead (ms)", profile.prefill.call_ms),
            *([("prefill compute, FastKV (ms)", profile.prefill.fastkv_compute_ms)]
              if profile.prefill.fastkv_compute_ms is not None else []),
            ("decode step (ms)", profile.decode.step_ms),
            ("decode join (ms)", profile.decode.join_ms)]
