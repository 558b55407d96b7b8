"""Prefill service: PrefillService.Prefill over grpc.aio; publishes each layer's KV to mmcache and
serves it to decode through the mmcache transfer service."""

from __future__ import annotations

import asyncio
import logging

from epdserve.config import CacheConfig, ModelConfig, PrefillConfig, ServerConfig
from epdserve.errors import FailedPreconditionError
from epdserve.models.checkpoint import model_revision
from epdserve.models.loader import load_decoder
from epdserve.models.spec import load_spec
from epdserve.transport.errors import unary_errors
from epdserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from mmcache.client import MMCache
from mmcache.keys import kv_layer_key, new_kv_prefix
from services.prefill.prefill import PromptPrefiller
from services.prefill.prefix import PrefixCache
from services.runtime import ModelExecutor, StageContext, Stopwatch, resolve_model_dir, run_stage, stage_main
from services.wire import sampling_from_proto

log = logging.getLogger(__name__)
SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, prefiller: PromptPrefiller, cache: MMCache, executor: ModelExecutor, config: PrefillConfig,
                 prefixes: PrefixCache) -> None:
        self.prefiller, self.cache, self.executor, self.config = prefiller, cache, executor, config
        self.prefixes = prefixes
        self._background: set[asyncio.Task] = set()

    @unary_errors
    async def Prefill(self, request: prefill_pb2.PrefillRequest, context) -> prefill_pb2.PrefillResponse:
        sampling = sampling_from_proto(request.sampling)
        token_ids = list(request.token_ids)
        watch = Stopwatch()
        hit = None
        try:
            with watch.section("cache_get_ms"):
                embeddings = await self._fetch_embeddings(request.image_embeddings)
                self.prefiller.validate(token_ids, embeddings)
                hit = await self.prefixes.lookup(token_ids, request.image_embeddings, request.cache_salt)
            with watch.section("prefill_ms"):
                result = await self.executor.run(
                    self.prefiller.run, token_ids, embeddings, sampling, hit.blocks,
                    (len(token_ids) // self.config.prefix_block_tokens) if self.config.prefix_cache else 0,
                    self.config.prefix_block_tokens)
        finally:  # inputs were copied into this request's KV (or it failed): end their leases
            leased = list(request.image_embeddings) + (hit.refs if hit else [])
            await asyncio.shield(self.cache.release(leased))
        with watch.section("kv_publish_ms"):
            refs = await self._publish(result.kv_layers)
        self._in_background(self.prefixes.publish(hit, result.new_blocks))
        watch.timings_ms["prefix_hit_tokens"] = float(result.length - result.computed_tokens)
        watch.timings_ms["computed_tokens"] = float(result.computed_tokens)
        return prefill_pb2.PrefillResponse(
            first_token_id=result.first_token_id,
            kv=common_pb2.KVHandle(layers=refs, length=result.length),
            timings_ms=watch.timings_ms,
        )

    def _in_background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fetch_embeddings(self, refs) -> list:
        if not refs:
            return []
        tensors = await self.cache.get_many(list(refs))
        missing = [i for i, t in enumerate(tensors) if t is None]
        if missing:
            raise FailedPreconditionError(f"image_embeddings[{missing[0]}]: entry is no longer in the cache")
        return tensors

    async def _publish(self, layers) -> list:
        """Publish the KV one entry per layer. If the RPC is cancelled meanwhile, the put still
        completes (shielded) and its entries are released at once instead of waiting for the TTL."""
        prefix = new_kv_prefix()
        items = [(kv_layer_key(prefix, i), layer) for i, layer in enumerate(layers)]
        put = asyncio.ensure_future(self.cache.put_many(
            items, ttl_s=self.config.kv_ttl_s, lease_s=self.config.kv_ttl_s, ephemeral=True))
        try:
            return await asyncio.shield(put)
        except asyncio.CancelledError:
            refs = await put
            await self.cache.release(refs)
            raise


async def serve(server_config: ServerConfig, model_config: ModelConfig, cache_config: CacheConfig,
                prefill_config: PrefillConfig) -> None:
    model_dir = resolve_model_dir(model_config)
    spec = load_spec(model_dir)
    revision = model_config.revision or model_revision(model_dir)
    decoder = load_decoder(spec, dtype=model_config.dtype, device=model_config.device)

    def register(ctx: StageContext) -> None:
        prefixes = PrefixCache(ctx.cache, prefill_config, revision, f"lossless/{decoder.dtype}", spec.image_token_id)
        servicer = PrefillServicer(PromptPrefiller(spec, decoder), ctx.cache, ctx.executor, prefill_config, prefixes)
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, ctx.server.server)

    await run_stage("prefill", SERVICE_NAME, server_config, cache_config, register)


def main(argv: list[str] | None = None) -> int:
    return stage_main("prefill", PrefillConfig, serve, argv)
