"""Drives one request through Encode -> Prefill -> Decode and turns tokens into streamed text.

Invariant: every KV the prefill stage publishes for a request is handed to exactly one decode
call (which releases it), including when generation ends at the first token (a decode call with
max_new_tokens=0 releases it) — or, if the request dies in between, it expires by TTL.
A vanished cache entry between stages (FAILED_PRECONDITION) re-runs the request from encode
without the cache lookup, at most `stage_retries` times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from epdserve.config import RouterConfig
from epdserve.errors import DeadlineExceededError, FailedPreconditionError
from epdserve.models.prompt import PromptBuilder, PromptTokens
from epdserve.models.spec import kept_tokens
from epdserve.transport.channels import aio_channel
from epdserve.transport.errors import from_rpc_error
from epdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    encode_pb2,
    encode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from services.router.requests import GenerationRequest, check_context
from services.router.text import IncrementalDetokenizer, StopStringMatcher
from services.wire import sampling_to_proto


@dataclasses.dataclass(frozen=True)
class TextChunk:
    text: str
    token_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Finished:
    finish_reason: str
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int
    timings_ms: dict[str, float]


class ReplicaPool:
    """Round-robin over one stage's replicas (cache- and load-aware choice comes later)."""

    def __init__(self, stage: str, addresses: Sequence[str], stub_cls) -> None:
        self.stage = stage
        self.channels = [aio_channel(a) for a in addresses]
        self.stubs = [stub_cls(c) for c in self.channels]
        self._next = itertools.cycle(range(len(self.stubs)))

    def pick(self):
        return self.stubs[next(self._next)]

    def shard(self, items: int) -> list[tuple[object, list[int]]]:
        """Spread `items` over the replicas round-robin: [(stub, item positions)], no empty shard."""
        first = next(self._next)
        shards: dict[int, list[int]] = {}
        for position in range(items):
            shards.setdefault((first + position) % len(self.stubs), []).append(position)
        return [(self.stubs[replica], positions) for replica, positions in shards.items()]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))


class Orchestrator:
    def __init__(self, config: RouterConfig, prompts: PromptBuilder) -> None:
        self.config, self.prompts = config, prompts
        self.max_context = prompts.spec.decoder.max_context
        self.stop_token_ids = prompts.eos_token_ids()
        self.encode = ReplicaPool("encode", config.encode, encode_pb2_grpc.EncodeServiceStub)
        self.prefill = ReplicaPool("prefill", config.prefill, prefill_pb2_grpc.PrefillServiceStub)
        self.decode = ReplicaPool("decode", config.decode, decode_pb2_grpc.DecodeServiceStub)

    def tokenize(self, req: GenerationRequest) -> PromptTokens:
        per_image = kept_tokens(self.prompts.tokens_per_image, req.image_keep_ratio)
        prompt = self.prompts.build(req.prompt, len(req.images), req.raw, per_image)
        check_context(len(prompt.token_ids), prompt.image_tokens, req.max_tokens, self.max_context)
        return prompt

    async def generate(self, req: GenerationRequest, prompt: PromptTokens, deadline: float) -> AsyncIterator:
        """Yield TextChunk events, then one Finished."""
        start = time.perf_counter()
        timings: dict[str, float] = {}
        prefill = await self._encode_and_prefill(req, prompt, deadline, timings)
        timings["ttft_ms"] = (time.perf_counter() - start) * 1000.0
        run = _Run(_TextStream(self.prompts.tokenizer, prompt.token_ids, req.stop), [prefill.first_token_id])
        chunk = run.stream.push(prefill.first_token_id)
        yield TextChunk(chunk.text, (prefill.first_token_id,))
        run.finish = "stop" if chunk.stopped else self._finish_reason(req, prefill.first_token_id, 1)
        if run.finish:
            await self._release_kv(prefill.kv, deadline)
        else:
            async for event in self._decode(req, prefill, run, deadline, timings):
                yield event
        tail = "" if run.stream.stopped else run.stream.flush()
        if tail:
            yield TextChunk(tail, ())
        timings["total_ms"] = (time.perf_counter() - start) * 1000.0
        _derived_timings(timings, len(run.tokens))
        yield Finished(run.finish, len(prompt.token_ids), prompt.image_tokens, len(run.tokens), timings)

    def _finish_reason(self, req: GenerationRequest, token: int, produced: int) -> str:
        if token in self.stop_token_ids and not req.ignore_eos:
            return "stop"
        return "length" if produced >= req.max_tokens else ""

    async def _encode_and_prefill(self, req, prompt, deadline, timings) -> prefill_pb2.PrefillResponse:
        skip_lookup = False
        for attempt in itertools.count():
            try:
                refs = await self._encode(req, deadline, timings, skip_lookup)
                return await self._prefill(req, prompt, refs, deadline, timings)
            except FailedPreconditionError:
                if attempt >= self.config.stage_retries or not req.images:
                    raise
                skip_lookup = True  # an embedding vanished between encode and prefill: re-encode
        raise AssertionError("unreachable")

    async def _encode(self, req, deadline, timings, skip_lookup: bool) -> list[common_pb2.TensorRef]:
        """Encode the request's images; with several encode replicas the images are spread over
        them (intra-request parallelism) and the embeddings come back in the original order."""
        if not req.images:
            return []
        shards = self.encode.shard(len(req.images))
        t0 = time.perf_counter()
        responses = await asyncio.gather(*(self._encode_shard(req, stub, positions, deadline, skip_lookup)
                                           for stub, positions in shards))
        timings["encode_rpc_ms"] = (time.perf_counter() - t0) * 1000.0
        timings["encode_replicas"] = float(len(shards))
        refs: list = [None] * len(req.images)
        for (_, positions), response in zip(shards, responses):
            for position, image in zip(positions, response.images):
                refs[position] = image
            _merge(timings, "encode.", response.timings_ms, accumulate=True)
        timings["encode_cache_hits"] = float(sum(image.cache_hit for image in refs))
        return [image.embedding for image in refs]

    async def _encode_shard(self, req, stub, positions: list[int], deadline, skip_lookup: bool):
        request = encode_pb2.EncodeRequest(
            request_id=req.request_id,
            images=[common_pb2.ImageInput(data=req.images[i]) for i in positions],
            skip_cache_lookup=skip_lookup,
            cache_salt=req.cache_salt,
            keep_ratio=req.image_keep_ratio,
        )
        return await _call("encode", stub.Encode(request, timeout=_remaining(deadline)))

    async def _prefill(self, req, prompt, refs, deadline, timings) -> prefill_pb2.PrefillResponse:
        request = prefill_pb2.PrefillRequest(
            request_id=req.request_id,
            token_ids=prompt.token_ids,
            image_embeddings=refs,
            sampling=sampling_to_proto(req.sampling),
            cache_salt=req.cache_salt,
            fastkv=req.fastkv,
        )
        t0 = time.perf_counter()
        response = await _call("prefill", self.prefill.pick().Prefill(request, timeout=_remaining(deadline)))
        timings["prefill_rpc_ms"] = (time.perf_counter() - t0) * 1000.0
        _merge(timings, "prefill.", response.timings_ms)
        return response

    def _decode_request(self, req, prefill, max_new_tokens: int) -> decode_pb2.DecodeRequest:
        return decode_pb2.DecodeRequest(
            request_id=req.request_id,
            kv=prefill.kv,
            first_token_id=prefill.first_token_id,
            max_new_tokens=max_new_tokens,
            sampling=sampling_to_proto(req.sampling),
            stop_token_ids=self.stop_token_ids,
            ignore_eos=req.ignore_eos,
        )

    async def _release_kv(self, kv: common_pb2.KVHandle, deadline: float) -> None:
        """Generation ended at the first token: a zero-token decode call releases the KV."""
        request = decode_pb2.DecodeRequest(kv=kv, max_new_tokens=0, first_token_id=0)
        call = self.decode.pick().Decode(request, timeout=_remaining(deadline))
        async for _ in _stream("decode", call):
            pass

    async def _decode(self, req, prefill, run: "_Run", deadline, timings):
        """Stream the tokens after the first; sets run.finish."""
        request = self._decode_request(req, prefill, req.max_tokens - 1)
        call = self.decode.pick().Decode(request, timeout=_remaining(deadline))
        try:
            async for response in _stream("decode", call):
                run.tokens.extend(response.token_ids)
                chunk = run.stream.push_many(response.token_ids)
                if response.token_ids:
                    yield TextChunk(chunk.text, tuple(response.token_ids))
                if chunk.stopped or response.finish_reason:
                    run.finish = "stop" if chunk.stopped else response.finish_reason
                    _merge(timings, "decode.", response.timings_ms)
                    return
            run.finish = "length"
        finally:
            call.cancel()

    async def close(self) -> None:
        await asyncio.gather(self.encode.close(), self.prefill.close(), self.decode.close())


@dataclasses.dataclass
class _Run:
    stream: "_TextStream"
    tokens: list[int]
    finish: str = ""


class _TextStream:
    def __init__(self, tokenizer, prompt_ids: list[int], stops: tuple[str, ...]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopStringMatcher(stops)
        self.stopped = False

    def push(self, token_id: int):
        return self.push_many([token_id])

    def push_many(self, token_ids) -> "_Chunk":
        text = "".join(self.detok.push(t) for t in token_ids)
        result = self.stops.push(text)
        self.stopped = self.stopped or result.stopped
        return _Chunk(result.text, result.stopped)

    def flush(self) -> str:
        result = self.stops.push(self.detok.flush())
        return result.text + ("" if result.stopped else self.stops.flush())


@dataclasses.dataclass(frozen=True)
class _Chunk:
    text: str
    stopped: bool


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0.05:
        raise DeadlineExceededError("request deadline exceeded before the next stage")
    return remaining


async def _call(stage: str, call):
    try:
        return await call
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, peer=stage) from None


async def _stream(stage: str, call):
    try:
        async for item in call:
            yield item
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            raise asyncio.CancelledError() from None
        raise from_rpc_error(exc, peer=stage) from None


def _merge(timings: dict[str, float], prefix: str, stage_timings, *, accumulate: bool = False) -> None:
    """Copy a stage's timings under `prefix`; `accumulate` sums counts over shards (and keeps the
    longest duration, since shards run in parallel)."""
    for name, value in stage_timings.items():
        key = prefix + name
        if accumulate and key in timings:
            combine = max if name.endswith("_ms") or name == "batch_size" else (lambda a, b: a + b)
            timings[key] = float(combine(timings[key], value))
        else:
            timings[key] = float(value)


def _derived_timings(timings: dict[str, float], completion_tokens: int) -> None:
    """KV hand-off = publish (prefill) + fetch (decode); TPOT = mean time per token after the first."""
    timings["kv_handoff_ms"] = timings.get("prefill.kv_publish_ms", 0.0) + timings.get("decode.kv_fetch_ms", 0.0)
    if completion_tokens > 1:
        timings["tpot_ms"] = (timings["total_ms"] - timings["ttft_ms"]) / (completion_tokens - 1)

