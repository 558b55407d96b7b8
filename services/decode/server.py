"""Decode service: DecodeService.Decode streams tokens over grpc.aio.

One model thread runs every step; concurrent requests interleave token by token. The KV
entries are released in mmcache as soon as they are loaded; a cancelled or aborted stream
stops within one step and drops its sequence.
"""

from __future__ import annotations

import asyncio
import logging
import time

from epdserve.config import CacheConfig, DecodeConfig, ModelConfig, ServerConfig
from epdserve.errors import FailedPreconditionError, InvalidArgumentError
from epdserve.models.loader import load_decoder
from epdserve.models.spec import load_spec
from epdserve.transport.errors import stream_errors, unary_errors
from epdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from mmcache.client import MMCache
from services.decode.decoder import TokenDecoder
from services.runtime import ModelExecutor, StageContext, Stopwatch, resolve_model_dir, run_stage, stage_main
from services.wire import sampling_from_proto

log = logging.getLogger(__name__)
SERVICE_NAME = decode_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, decoder: TokenDecoder, cache: MMCache, executor: ModelExecutor, config: DecodeConfig) -> None:
        self.decoder, self.cache, self.executor, self.config = decoder, cache, executor, config
        self.aborted: set[str] = set()
        self.active: set[str] = set()

    @stream_errors
    async def Decode(self, request: decode_pb2.DecodeRequest, context):
        self._validate(request)
        sampling = sampling_from_proto(request.sampling)
        watch = Stopwatch()
        with watch.section("kv_fetch_ms"):
            seq = await self._load_kv(request, sampling)
        if seq is None:  # max_new_tokens == 0: the call only released the KV
            yield decode_pb2.DecodeResponse(finish_reason="length", timings_ms=watch.timings_ms)
            return
        self.active.add(request.request_id)
        try:
            async for response in self._generate(request, seq, watch):
                yield response
        finally:
            self.active.discard(request.request_id)
            self.aborted.discard(request.request_id)

    async def _generate(self, request, seq, watch: Stopwatch):
        stop_ids = set() if request.ignore_eos else set(request.stop_token_ids)
        start = time.perf_counter()
        for produced in range(1, request.max_new_tokens + 1):
            if request.request_id in self.aborted:
                yield decode_pb2.DecodeResponse(finish_reason="abort", timings_ms=watch.timings_ms)
                return
            token = await self.executor.run(self.decoder.step, seq)
            finish = "stop" if token in stop_ids else "length" if produced == request.max_new_tokens else ""
            if finish:
                watch.timings_ms["decode_ms"] = (time.perf_counter() - start) * 1000.0
                watch.timings_ms["decode_steps"] = float(produced)
                yield decode_pb2.DecodeResponse(token_ids=[token], finish_reason=finish, timings_ms=watch.timings_ms)
                return
            yield decode_pb2.DecodeResponse(token_ids=[token])

    def _validate(self, request: decode_pb2.DecodeRequest) -> None:
        if not 0 <= request.max_new_tokens <= self.config.max_new_tokens_limit:
            raise InvalidArgumentError(
                f"max_new_tokens must be in [0, {self.config.max_new_tokens_limit}] (got {request.max_new_tokens})"
            )
        if request.kv.length <= 0 or not request.kv.layers:
            raise InvalidArgumentError("kv: the KV handle is empty")
        vocab = self.decoder.decoder.spec.vocab_size
        if not 0 <= request.first_token_id < vocab:
            raise InvalidArgumentError(f"first_token_id {request.first_token_id} is outside [0, {vocab})")

    async def _load_kv(self, request: decode_pb2.DecodeRequest, sampling):
        """Copy the published KV into this sequence's own cache, then end the hand-off leases (the
        producer frees the bytes) whatever happens. None when nothing is to be generated."""
        refs = list(request.kv.layers)
        try:
            if request.max_new_tokens == 0:
                return None
            layers = await self.cache.get_many(refs)
            missing = [i for i, t in enumerate(layers) if t is None]
            if missing:
                raise FailedPreconditionError(f"kv.layers[{missing[0]}]: entry is no longer in the cache")
            self.decoder.check_layers(layers, request.kv.length)
            return await self.executor.run(
                self.decoder.load, layers, request.first_token_id, request.max_new_tokens, sampling, request.kv.length
            )
        finally:
            await asyncio.shield(self.cache.release(refs))

    @unary_errors
    async def Abort(self, request: common_pb2.AbortRequest, context) -> common_pb2.AbortResponse:
        found = request.request_id in self.active
        if found:
            self.aborted.add(request.request_id)
        return common_pb2.AbortResponse(found=found)


async def serve(server_config: ServerConfig, model_config: ModelConfig, cache_config: CacheConfig,
                decode_config: DecodeConfig) -> None:
    spec = load_spec(resolve_model_dir(model_config))
    decoder = load_decoder(spec, dtype=model_config.dtype, device=model_config.device)

    def register(ctx: StageContext) -> None:
        servicer = DecodeServicer(TokenDecoder(decoder), ctx.cache, ctx.executor, decode_config)
        decode_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, ctx.server.server)

    await run_stage("decode", SERVICE_NAME, server_config, cache_config, register)


def main(argv: list[str] | None = None) -> int:
    return stage_main("decode", DecodeConfig, serve, argv)
