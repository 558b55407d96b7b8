"""Decode service: DecodeService.Decode streams tokens over grpc.aio.

Every request joins one continuously batched engine (services/decode/engine.py) that steps all
running sequences together on the model thread. A request's hand-off KV leases end as soon as
the engine no longer reads its layers (copied into the paged KV, or into private memory while it
waits for free KV); a cancelled or aborted stream is dropped at the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging
import time

from epdserve import tracing
from epdserve.config import CacheConfig, DecodeConfig, EncodeConfig, ModelConfig, ServerConfig
from epdserve.errors import FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError
from epdserve.models.loader import load_decoder
from epdserve.models.spec import load_spec
from epdserve.security import NO_CREDENTIALS, Credentials
from epdserve.transport.errors import stream_errors, unary_errors
from epdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, load_pb2
from mmcache.client import MMCache
from services.decode.decoder import check_layers
from services.decode.engine import DecodeEngine, DecodeJob
from services.decode.held_kv import HeldKV
from services.decode.local_prefill import PromptJob
from services.decode.loop import EngineLoop
from services.decode.setup import build_engine, place_experts
from services.load import LoadTracker
from services.metrics import register_decode_metrics
from services.runtime import StageContext, Stopwatch, resolve_model_dir, run_stage, stage_main
from services.wire import sampling_from_proto

log = logging.getLogger(__name__)
SERVICE_NAME = decode_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, engine: DecodeEngine, loop: EngineLoop, cache: MMCache, config: DecodeConfig,
                 load: LoadTracker | None = None) -> None:
        self.engine, self.loop, self.cache, self.config = engine, loop, cache, config
        self.held = HeldKV(max(1, int(config.held_kv_gib * 2**30)))
        self.load = load or LoadTracker("decode", "")
        self.load.extra = self.load_fields

    def load_fields(self, report: load_pb2.LoadReport) -> None:
        """The decode-specific fields of this replica's load report (read from the event loop)."""
        engine, kv = self.engine, self.engine.kv
        report.running_tokens = kv.num_used_rows
        report.free_kv_blocks, report.total_kv_blocks = kv.num_free_blocks, kv.capacity_blocks
        report.kv_block_tokens, report.max_running = kv.shape.block_size, self.config.max_running
        report.step_ms = self.loop.step_ms
        report.local_prefill_max_tokens = self.config.local_prefill_max_tokens if engine.local is not None else 0

    @stream_errors
    async def Decode(self, request: decode_pb2.DecodeRequest, context):
        work = len(request.prompt.token_ids) if request.HasField("prompt") else 0
        attributes = {"epdserve.request_id": request.request_id, "epdserve.max_new_tokens": request.max_new_tokens,
                      "epdserve.local_prefill": request.HasField("prompt")}
        with (self.load.request(work),  # a generator: the span is not made current
              tracing.detached_span("decode.Decode", attributes, parent=tracing.caller_span(context),
                                    kind="server") as span):
            async for response in self._decode(request, span):
                yield response

    async def _decode(self, request: decode_pb2.DecodeRequest, span=tracing.NO_SPAN):
        local = request.HasField("prompt")
        if local:
            self._validate_prompt(request)
        else:
            self._validate(request)
        refs = list(request.prompt.image_embeddings if local else request.kv.layers)
        if request.max_new_tokens == 0:  # the call only releases its inputs
            await self.cache.release(refs)
            yield decode_pb2.DecodeResponse(finish_reason="length")
            return
        watch = Stopwatch()
        with watch.section("held_kv_wait_ms"):
            await self.held.acquire(held := sum(ref.nbytes for ref in refs))
        released = finished = produced = False
        try:
            with (watch.section("prompt_fetch_ms" if local else "kv_fetch_ms"),
                  tracing.span("decode.prompt_fetch" if local else "decode.kv_pull", parent=span)):
                job = await (self._prompt_job(request, refs) if local else self._job(request, refs))
            events = self.loop.submit(job)
            responses = self._stream(request, events, watch)
            try:
                async for response in _traced(responses, span) if span.is_recording() else responses:
                    if response is None:  # the engine no longer reads the leased layers
                        self.held.release(held)
                        held = 0
                        await self.cache.release(refs)
                        released = True
                        continue
                    finished = bool(response.finish_reason)
                    produced = True
                    yield response
            finally:
                if not finished:
                    self.loop.abort(request.request_id)
                self.loop.forget(request.request_id)
        finally:
            self.held.release(held)
            # a replica whose engine failed keeps a request's inputs leased when it produced nothing:
            # the router re-sends the request to another replica, which reads them (the lease
            # deadline frees them otherwise)
            if not released and not (self.loop.executor.failed is not None and not produced):
                await asyncio.shield(self.cache.release(refs))

    async def _stream(self, request, events, watch: Stopwatch):
        """DecodeResponses from the engine's events; None marks "inputs no longer needed"."""
        queued, start, largest_batch, batch_sum, steps = time.perf_counter(), None, 0, 0, 0
        while True:
            event = await events.get()
            if event.kind == "inputs_done":
                yield None
            elif event.kind == "error":
                raise event.error
            elif event.kind == "abort":
                yield decode_pb2.DecodeResponse(finish_reason="abort", timings_ms=watch.timings_ms)
                return
            elif not event.finish:
                largest_batch = max(largest_batch, event.batch_size)
                batch_sum, steps = batch_sum + event.batch_size, steps + 1
                if start is None:
                    start = time.perf_counter()
                    watch.timings_ms["queue_ms"] = (start - queued) * 1000.0
                yield decode_pb2.DecodeResponse(token_ids=[event.token])
            else:
                watch.timings_ms["decode_ms"] = (time.perf_counter() - (start or queued)) * 1000.0
                watch.timings_ms["decode_batch_max"] = float(max(largest_batch, event.batch_size))
                watch.timings_ms["decode_steps"] = float(steps + 1)
                watch.timings_ms["decode_batch_mean"] = (batch_sum + event.batch_size) / (steps + 1)
                yield decode_pb2.DecodeResponse(token_ids=[event.token], finish_reason=event.finish,
                                                timings_ms=watch.timings_ms)
                return

    def _validate(self, request: decode_pb2.DecodeRequest) -> None:
        if not 0 <= request.max_new_tokens <= self.config.max_new_tokens_limit:
            raise InvalidArgumentError(
                f"max_new_tokens must be in [0, {self.config.max_new_tokens_limit}] (got {request.max_new_tokens})"
            )
        if request.kv.length <= 0 or not request.kv.layers:
            raise InvalidArgumentError("kv: the KV handle is empty")
        vocab = self.engine.runner.decoder.spec.vocab_size
        if not 0 <= request.first_token_id < vocab:
            raise InvalidArgumentError(f"first_token_id {request.first_token_id} is outside [0, {vocab})")

    def _validate_prompt(self, request: decode_pb2.DecodeRequest) -> None:
        local = self.engine.local
        if local is None:
            raise FailedPreconditionError("prompt: this decode service does not prefill (--no-local-prefill)")
        if request.kv.layers:
            raise InvalidArgumentError("kv and prompt are exclusive: send the KV handle or the prompt")
        limit = self.config.local_prefill_max_tokens
        if len(request.prompt.token_ids) > limit:
            raise InvalidArgumentError(f"prompt.token_ids: {len(request.prompt.token_ids)} tokens exceeds this decode "
                                       f"service's local prefill limit ({limit}, --local-prefill-max-tokens)")
        if not 0 <= request.max_new_tokens <= self.config.max_new_tokens_limit:
            raise InvalidArgumentError(
                f"max_new_tokens must be in [0, {self.config.max_new_tokens_limit}] (got {request.max_new_tokens})")

    async def _prompt_job(self, request: decode_pb2.DecodeRequest, refs) -> PromptJob:
        embeddings = await self.cache.get_many(refs) if refs else []
        missing = [i for i, t in enumerate(embeddings) if t is None]
        if missing:
            raise FailedPreconditionError(f"prompt.image_embeddings[{missing[0]}]: entry is no longer in the cache")
        token_ids = list(request.prompt.token_ids)
        try:
            await self.engine.local.prefiller.validate_off_loop(token_ids, embeddings)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"prompt.{exc.message}") from None
        stops = frozenset() if request.ignore_eos else frozenset(request.stop_token_ids)
        job = PromptJob(request.request_id, token_ids, embeddings, request.max_new_tokens,
                        sampling_from_proto(request.sampling), stops)
        self._check_fits(len(token_ids) + request.max_new_tokens)
        return job

    async def _job(self, request: decode_pb2.DecodeRequest, refs) -> DecodeJob:
        layers = await self.cache.get_many(refs)
        missing = [i for i, t in enumerate(layers) if t is None]
        if missing:
            raise FailedPreconditionError(f"kv.layers[{missing[0]}]: entry is no longer in the cache")
        check_layers(self.engine.runner.decoder.spec, layers, request.kv.length)
        stops = frozenset() if request.ignore_eos else frozenset(request.stop_token_ids)
        job = DecodeJob(request.request_id, layers, request.kv.length, request.first_token_id,
                        request.max_new_tokens, sampling_from_proto(request.sampling), stops)
        self._check_fits(job.reserve_tokens)
        return job

    def _check_fits(self, reserve_tokens: int) -> None:
        kv = self.engine.kv
        if reserve_tokens > kv.shape.max_tokens_per_row:
            raise InvalidArgumentError(
                f"prompt rows + max_new_tokens = {reserve_tokens} exceeds this decode service's max context "
                f"({kv.shape.max_tokens_per_row} tokens, --max-context)")
        if not kv.fits_ever(reserve_tokens):
            raise ResourceExhaustedError(
                f"the request needs {kv.blocks_for(reserve_tokens)} KV blocks; this decode service holds "
                f"{kv.capacity_blocks} in all (--kv-cache-gib)")

    @unary_errors
    async def Abort(self, request: common_pb2.AbortRequest, context) -> common_pb2.AbortResponse:
        return common_pb2.AbortResponse(found=self.loop.abort(request.request_id))


async def _traced(responses, parent):
    """`responses` with their phases as children of `parent`: decode.queue from submission to the
    first token (an E -> PD prompt's prefill included), then decode.stream to the end (one span and
    one first_token event per request, nothing per token)."""
    phase, tokens, error = tracing.start_span("decode.queue", parent=parent), 0, None
    try:
        async for response in responses:
            if response is not None and response.token_ids and not tokens:
                tracing.end_span(phase)
                parent.add_event("first_token")
                phase = tracing.start_span("decode.stream", parent=parent)
            tokens += len(response.token_ids) if response is not None else 0
            yield response
    except BaseException as exc:
        error = exc
        raise
    finally:
        tracing.end_span(phase, error, {"epdserve.tokens": tokens})


async def serve(server_config: ServerConfig, model_config: ModelConfig, cache_config: CacheConfig,
                decode_config: DecodeConfig, credentials: Credentials = NO_CREDENTIALS,
                encode_config: EncodeConfig = EncodeConfig()) -> None:
    """Serve decode; with --with-encode also EncodeService (aggregated E+PD: encode batches and
    decode steps, local prefills included, take turns on the one model thread)."""
    model_dir = resolve_model_dir(model_config)
    colocated = ()
    if decode_config.with_encode:
        from services.encode.server import colocated_encode

        colocated = (colocated_encode(model_dir, model_config, cache_config, encode_config),)
    spec = load_spec(model_dir)
    decoder = load_decoder(spec, dtype=model_config.dtype, device=model_config.device)
    experts = place_experts(decoder, decode_config)
    engine = build_engine(decoder, decode_config, spec)

    def register(ctx: StageContext) -> None:
        servicer = DecodeServicer(engine, EngineLoop(engine, ctx.executor), ctx.cache, decode_config, ctx.load)
        decode_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, ctx.server.server)
        register_decode_metrics(ctx.metrics.registry, engine, experts)

    try:
        await run_stage("decode", SERVICE_NAME, server_config, cache_config, register, credentials, colocated)
    finally:
        if experts is not None:
            log.info("expert offloading: %s", experts.stats().as_dict())
            experts.close()


def main(argv: list[str] | None = None) -> int:
    return stage_main("decode", DecodeConfig, serve, argv, also=(EncodeConfig,))
