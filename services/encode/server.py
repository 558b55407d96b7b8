"""Encode service: EncodeService.Encode over grpc.aio, plus the mmcache transfer service for
the embeddings it owns."""

from __future__ import annotations

import asyncio
import logging

from epdserve.config import CacheConfig, EncodeConfig, ModelConfig, ServerConfig
from epdserve.errors import InvalidArgumentError, ResourceExhaustedError
from epdserve.models.checkpoint import model_revision
from epdserve.models.spec import load_spec
from epdserve.transport.errors import unary_errors
from epdserve.v1 import encode_pb2, encode_pb2_grpc
from mmcache.client import MMCache
from services.encode.encoder import ImageEncoder
from services.encode.images import decode_image
from services.runtime import ModelExecutor, StageContext, Stopwatch, resolve_model_dir, run_stage, stage_main

log = logging.getLogger(__name__)
SERVICE_NAME = encode_pb2.DESCRIPTOR.services_by_name["EncodeService"].full_name


class EncodeServicer(encode_pb2_grpc.EncodeServiceServicer):
    def __init__(self, encoder: ImageEncoder, cache: MMCache, executor: ModelExecutor, config: EncodeConfig) -> None:
        self.encoder, self.cache, self.executor, self.config = encoder, cache, executor, config

    @unary_errors
    async def Encode(self, request: encode_pb2.EncodeRequest, context) -> encode_pb2.EncodeResponse:
        self._check_count(len(request.images))
        watch = Stopwatch()
        with watch.section("decode_ms"):
            images = await asyncio.gather(
                *(asyncio.to_thread(decode_image, img.data, i, self.config) for i, img in enumerate(request.images))
            )
            keys = await asyncio.gather(
                *(asyncio.to_thread(self.encoder.key, image, request.cache_salt) for image in images))
        refs = [None] * len(keys)
        if not request.skip_cache_lookup:
            with watch.section("cache_lookup_ms"):
                refs = await self.cache.lookup_many(keys, ttl_s=self.config.embedding_ttl_s,
                                                    lease_s=self.config.handoff_lease_s)
        hits = [ref is not None for ref in refs]
        await self._encode_misses(images, keys, refs, watch)
        return encode_pb2.EncodeResponse(
            images=[
                encode_pb2.ImageEmbedding(embedding=ref, num_tokens=ref.shape[0], cache_hit=hit)
                for ref, hit in zip(refs, hits)
            ],
            timings_ms=watch.timings_ms,
        )

    def _check_count(self, count: int) -> None:
        if count == 0:
            raise InvalidArgumentError("images: at least one image is required")
        if count > self.config.max_images_per_request:
            raise ResourceExhaustedError(
                f"images: {count} images exceeds max_images_per_request ({self.config.max_images_per_request})"
            )

    async def _encode_misses(self, images, keys, refs, watch: Stopwatch) -> None:
        """Encode each distinct missing image once, publish it, and fill its refs in place."""
        missing = {}
        for i, ref in enumerate(refs):
            if ref is None:
                missing.setdefault(keys[i], images[i])
        if not missing:
            return
        with watch.section("encode_ms"):
            embeddings = await self.executor.run(self.encoder.encode, list(missing.values()))
        with watch.section("cache_put_ms"):
            published = await self.cache.put_many(
                list(zip(missing.keys(), embeddings)), ttl_s=self.config.embedding_ttl_s,
                lease_s=self.config.handoff_lease_s,
            )
        by_key = dict(zip(missing.keys(), published))
        for i, ref in enumerate(refs):
            if ref is None:
                refs[i] = by_key[keys[i]]


async def serve(server_config: ServerConfig, model_config: ModelConfig, cache_config: CacheConfig,
                encode_config: EncodeConfig) -> None:
    model_dir = resolve_model_dir(model_config)
    spec = load_spec(model_dir)
    revision = model_config.revision or model_revision(model_dir)
    encoder = ImageEncoder(spec, model_dir, revision, dtype=model_config.dtype, device=model_config.device)

    def register(ctx: StageContext) -> None:
        servicer = EncodeServicer(encoder, ctx.cache, ctx.executor, encode_config)
        encode_pb2_grpc.add_EncodeServiceServicer_to_server(servicer, ctx.server.server)

    await run_stage("encode", SERVICE_NAME, server_config, cache_config, register)


def main(argv: list[str] | None = None) -> int:
    return stage_main("encode", EncodeConfig, serve, argv)
