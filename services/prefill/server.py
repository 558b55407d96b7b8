"""Prefill service: PrefillService.Prefill over grpc.aio; publishes each layer's KV to mmcache and
serves it to decode through the mmcache transfer service."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time

from epdserve import tracing
from epdserve.config import CacheConfig, EncodeConfig, ModelConfig, PrefillConfig, ServerConfig
from epdserve.errors import FailedPreconditionError, InvalidArgumentError
from epdserve.models.checkpoint import model_revision
from epdserve.models.loader import load_decoder
from epdserve.models.spec import load_spec
from epdserve.security import NO_CREDENTIALS, Credentials
from epdserve.transport.errors import unary_errors
from epdserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from mmcache.client import MMCache
from services.load import LoadTracker
from services.metrics import PrefillMetrics
from services.prefill.fastkv import FastKVConfig
from services.prefill.minisequence import MiniSequenceConfig
from services.prefill.prefill import PrefillResult, PromptPrefiller
from services.prefill.prefix import PrefixCache, PrefixHit
from services.prefill.publish import KVLayout, LayerPublisher
from services.runtime import (
    ModelExecutor,
    StageContext,
    Stopwatch,
    resolve_model_dir,
    run_stage,
    stage_main,
)
from services.wire import check_embedding_ref, fastkv_from_proto, sampling_from_proto

log = logging.getLogger(__name__)
PREFIX_CUT_LEASE_S = 120.0  # a prompt's KV held for cutting its prefix blocks at most this long
SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, prefiller: PromptPrefiller, cache: MMCache, executor: ModelExecutor, config: PrefillConfig,
                 prefixes: PrefixCache, load: LoadTracker | None = None, metrics: PrefillMetrics | None = None) -> None:
        self.prefiller, self.cache, self.executor, self.config = prefiller, cache, executor, config
        self.metrics = metrics
        self.prefixes = prefixes
        self.load = load or LoadTracker("prefill", "")
        self.fastkv_settings = _fastkv_settings(config)
        self.fastkv_default = self.fastkv_settings if config.fastkv else None
        self.publisher = LayerPublisher(cache, executor, config, self.load, prefiller.decoder.device)
        self._background: set[asyncio.Task] = set()

    @unary_errors
    async def Prefill(self, request: prefill_pb2.PrefillRequest, context) -> prefill_pb2.PrefillResponse:
        attributes = {"epdserve.request_id": request.request_id, "epdserve.prompt_tokens": len(request.token_ids),
                      "epdserve.images": len(request.image_embeddings)}
        remaining = context.time_remaining()
        deadline = math.inf if remaining is None else time.monotonic() + remaining
        with self.load.request(len(request.token_ids)), tracing.server_span("prefill.Prefill", context, attributes):
            watch, published = Stopwatch(), []
            try:
                hit, result = await self._prefill(request, deadline, watch, published)
            except BaseException:  # failed after its KV was published (cancelled on the way out): let it go now
                await asyncio.shield(self.cache.release(published))
                raise
            return self._respond(hit, result, published, watch)

    async def _prefill(self, request: prefill_pb2.PrefillRequest, deadline: float, watch: Stopwatch,
                       published: list) -> tuple[PrefixHit, PrefillResult]:
        """Fetch and check the inputs, reserve the prompt's KV in the pool (waiting for room), look
        up its cached prefix, run the prefill; the KV refs land in `published`."""
        sampling = sampling_from_proto(request.sampling)
        fastkv = fastkv_from_proto(request, self.fastkv_default, base=self.fastkv_settings)
        token_ids = list(request.token_ids)
        hit = PrefixHit([], [], [])
        try:
            with watch.section("cache_get_ms"), tracing.span("prefill.fetch_inputs"):
                embeddings = await self._fetch_embeddings(request.image_embeddings)
                await self.prefiller.validate_off_loop(token_ids, embeddings)
                self._check_fastkv(fastkv)
                layout = self._layout(len(token_ids), fastkv)
            with watch.section("kv_wait_ms"):  # before the prefix lookup: a waiting prompt holds no cached blocks
                reserved = await self.publisher.reserve(
                    layout, min(self.config.kv_wait_s, max(0.0, deadline - time.monotonic())),
                    held_bytes=self._held_here(request.image_embeddings),
                    what=f"token_ids: the KV of this {len(token_ids)}-token prompt")
            try:
                with watch.section("cache_get_ms"), tracing.span("prefill.prefix_lookup") as lookup:
                    if fastkv is None:  # FastKV's KV depends on the whole prompt: no prefix reuse
                        hit = await self.prefixes.lookup(token_ids, request.image_embeddings, request.cache_salt)
                    lookup.set_attribute("epdserve.prefix_blocks_cached", hit.blocks_cached)
            except BaseException:
                self.cache.abandon(reserved)  # nothing was written into it yet
                raise
            publish_upto = len(token_ids) // self.config.prefix_block_tokens
            publish_upto = publish_upto if self.config.prefix_cache and fastkv is None else 0
            computed = len(token_ids) - hit.blocks_cached * self.config.prefix_block_tokens
            with watch.section("prefill_ms"):
                result, refs = await self.publisher.run(
                    functools.partial(self.prefiller.run, token_ids, embeddings, sampling, hit.blocks, publish_upto,
                                      self.config.prefix_block_tokens, fastkv=fastkv),
                    reserved, watch, computed)
                published.extend(refs)
        finally:  # inputs were copied into this request's KV (or it failed): end their leases
            await asyncio.shield(self.cache.release(list(request.image_embeddings) + hit.refs))
        return hit, result

    def _respond(self, hit: PrefixHit, result: PrefillResult, refs: list, watch: Stopwatch):
        self._publish_prefix(hit, result, refs)
        watch.timings_ms["prefix_hit_tokens"] = float(result.length - result.computed_tokens)
        watch.timings_ms["computed_tokens"] = float(result.computed_tokens)
        watch.timings_ms["kv_tokens_stored"] = float(sum(layer.shape[2] for layer in result.kv_layers))
        if self.metrics is not None:
            self.metrics.prefilled(result.length, result.length - result.computed_tokens)
        return prefill_pb2.PrefillResponse(
            first_token_id=result.first_token_id,
            kv=common_pb2.KVHandle(layers=refs, length=result.length),
            timings_ms=watch.timings_ms,
        )

    def _held_here(self, refs) -> int:
        """Bytes of these inputs in this process's own pool (E+P colocated: its images' embeddings)."""
        return sum(ref.nbytes for ref in refs if ref.owner == self.cache.owner.owner_id)

    def _layout(self, length: int, fastkv: FastKVConfig | None) -> KVLayout:
        """The prompt's KV, reserved before it is computed (FastKV's plan says what each layer keeps)."""
        d = self.prefiller.spec.decoder
        lengths = [length] * d.num_layers
        if fastkv is not None:
            try:
                lengths = fastkv.plan(d.num_layers, length).stored_lengths(length)
            except ValueError as exc:  # the deployment's --fastkv-tsp-layer does not fit the model
                raise FailedPreconditionError(f"fastkv: {exc} (--fastkv-tsp-layer)") from None
        return KVLayout(tuple(lengths), d.num_kv_heads, d.head_dim, self.prefiller.decoder.dtype)

    def _publish_prefix(self, hit: PrefixHit, result: PrefillResult, refs: list) -> None:
        """Cache the prompt's new prefix blocks in the background. Where its KV layers are views of
        the pool (copied there directly), their entries are leased until the blocks are cut out of
        them: decode may take and free them first."""
        first, end = result.new_block_range
        if end > first:
            held = refs if self.publisher.direct else []
            holds = [(ref.key, self.cache.lease_local(ref.key, PREFIX_CUT_LEASE_S)) for ref in held]
            self._in_background(self.prefixes.publish(hit, result, holds))

    def _check_fastkv(self, fastkv) -> None:
        if fastkv is not None and any(w is not None for w in self.prefiller.spec.decoder.sliding_windows):
            raise InvalidArgumentError("fastkv: not supported with sliding-window attention (this model has it)")

    def _in_background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fetch_embeddings(self, refs) -> list:
        if not refs:
            return []
        d = self.prefiller.spec.decoder
        for i, ref in enumerate(refs):
            check_embedding_ref(ref, f"image_embeddings[{i}]", hidden_size=d.hidden_size, max_rows=d.max_context)
        tensors = await self.cache.get_many(list(refs))
        missing = [i for i, t in enumerate(tensors) if t is None]
        if missing:
            raise FailedPreconditionError(f"image_embeddings[{missing[0]}]: entry is no longer in the cache")
        return tensors

async def serve(server_config: ServerConfig, model_config: ModelConfig, cache_config: CacheConfig,
                prefill_config: PrefillConfig, credentials: Credentials = NO_CREDENTIALS,
                encode_config: EncodeConfig = EncodeConfig()) -> None:
    """Serve prefill; with --with-encode also EncodeService (E+P colocated: one model thread runs
    both stages' work in arrival order, embeddings stay in this process's own cache)."""
    model_dir = resolve_model_dir(model_config)
    colocated = ()
    if prefill_config.with_encode:
        from services.encode.server import colocated_encode

        colocated = (colocated_encode(model_dir, model_config, cache_config, encode_config),)
    spec = load_spec(model_dir)
    revision = model_config.revision or model_revision(model_dir)
    decoder = load_decoder(spec, dtype=model_config.dtype, device=model_config.device)

    def register(ctx: StageContext) -> None:
        prefixes = PrefixCache(ctx.cache, prefill_config, revision, f"lossless/{decoder.dtype}", spec.image_token_id)
        mini = MiniSequenceConfig(prefill_config.chunk_tokens, prefill_config.min_chunk_tokens,
                                  prefill_config.last_position_only)
        servicer = PrefillServicer(PromptPrefiller(spec, decoder, mini), ctx.cache, ctx.executor, prefill_config,
                                   prefixes, ctx.load, PrefillMetrics(ctx.metrics.registry))
        kv_bytes_per_token = spec.decoder.kv_bytes_per_token * decoder.dtype.itemsize
        ctx.load.extra = functools.partial(_prefill_fields, prefixes, ctx.cache, kv_bytes_per_token,
                                           spec.decoder.max_context)
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, ctx.server.server)

    await run_stage("prefill", SERVICE_NAME, server_config, cache_config, register, credentials, colocated,
                    page_lock_cache=prefill_config.kv_zero_copy and decoder.device.type == "cuda")


def _prefill_fields(prefixes: PrefixCache, cache: MMCache, kv_bytes_per_token: int, max_context: int,
                    report) -> None:
    """How this replica keys its prefix blocks (the router computes the same keys to look up a
    prompt's cached prefix), where it runs, and the room its pool has for prompts' KV (counted up
    to the longest prompt's: all the router asks is whether a prompt fits)."""
    if prefixes.config.prefix_cache:
        report.prefix_block_tokens = prefixes.config.prefix_block_tokens
        report.prefix_kv_settings, report.model_revision = prefixes.kv_settings, prefixes.revision
    report.host_id = cache.owner.host_id
    report.kv_pool_room_bytes = cache.room_bytes(enough=max_context * kv_bytes_per_token)
    report.kv_bytes_per_token = kv_bytes_per_token


def _fastkv_settings(config: PrefillConfig) -> FastKVConfig:
    """FastKV as this deployment's flags configure it: every request's under --fastkv, and the
    base of a request that turns it on itself otherwise."""
    return FastKVConfig(tsp_rate=config.fastkv_tsp_rate, retain_rate=config.fastkv_retain_rate,
                        tsp_layer=config.fastkv_tsp_layer, head_selection=config.fastkv_head_selection)


def main(argv: list[str] | None = None) -> int:
    return stage_main("prefill", PrefillConfig, serve, argv, also=(EncodeConfig,))
