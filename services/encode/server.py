"""Encode service: EncodeService.Encode over grpc.aio, plus the mmcache transfer service for
the embeddings it owns."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from epdserve import tracing
from epdserve.config import CacheConfig, EncodeConfig, ModelConfig, ServerConfig
from epdserve.errors import InvalidArgumentError, ResourceExhaustedError
from epdserve.models.checkpoint import model_revision
from epdserve.models.spec import load_spec
from epdserve.security import NO_CREDENTIALS, Credentials
from epdserve.threadpool import DealtPool
from epdserve.transport.errors import unary_errors
from epdserve.v1 import encode_pb2, encode_pb2_grpc
from mmcache.client import MMCache
from services.encode.batcher import EncodeBatcher
from services.encode.encoder import ImageEncoder, RecentKeys
from services.encode.images import decode_image
from services.encode.sparsify import build_scorer
from services.metrics import EncodeMetrics
from services.runtime import Colocated, StageContext, Stopwatch, resolve_model_dir, run_stage, stage_main

log = logging.getLogger(__name__)
SERVICE_NAME = encode_pb2.DESCRIPTOR.services_by_name["EncodeService"].full_name


class EncodeServicer(encode_pb2_grpc.EncodeServiceServicer):
    def __init__(self, encoder: ImageEncoder, batcher: EncodeBatcher, cache: MMCache, config: EncodeConfig,
                 metrics: EncodeMetrics | None = None) -> None:
        self.encoder, self.batcher, self.cache, self.config = encoder, batcher, cache, config
        self.metrics = metrics
        self.recent = RecentKeys()
        self.decoders = DealtPool(config.decode_threads or default_decode_threads(), "decode")

    @unary_errors
    async def Encode(self, request: encode_pb2.EncodeRequest, context) -> encode_pb2.EncodeResponse:
        attributes = {"epdserve.request_id": request.request_id, "epdserve.images": len(request.images)}
        with self.batcher.load.request(len(request.images)), tracing.server_span("encode.Encode", context, attributes):
            return await self._encode(request)

    async def _encode(self, request: encode_pb2.EncodeRequest) -> encode_pb2.EncodeResponse:
        self._check_count(len(request.images))
        keep = request.keep_ratio or 1.0
        if not 0.0 < keep <= 1.0:
            raise InvalidArgumentError(f"keep_ratio must be in (0, 1] (got {keep})")
        watch = Stopwatch()
        with watch.section("decode_ms"):
            identified = await self.decoders.map(
                self._identify, [(img.data, i, request.cache_salt, keep) for i, img in enumerate(request.images)])
        keys, images = [key for key, _ in identified], [image for _, image in identified]
        refs = [None] * len(keys)
        if not request.skip_cache_lookup:
            with watch.section("cache_lookup_ms"), tracing.span("encode.cache_lookup") as lookup:
                refs = await self.cache.lookup_many(keys, ttl_s=self.config.embedding_ttl_s,
                                                    lease_s=self.config.handoff_lease_s)
                misses = refs.count(None)
                lookup.set_attributes({"epdserve.hits": len(refs) - misses, "epdserve.misses": misses})
        await self._decode_undecoded_misses(request, images, refs)
        hits = [ref is not None for ref in refs]
        await self._encode_misses(images, keys, refs, keep, watch)
        watch.timings_ms["images_cached"] = float(sum(hits))
        if self.metrics is not None:
            self.metrics.images(sum(hits), len(hits) - sum(hits))
        return encode_pb2.EncodeResponse(
            images=[
                encode_pb2.ImageEmbedding(embedding=ref, num_tokens=ref.shape[0], cache_hit=hit)
                for ref, hit in zip(refs, hits)
            ],
            timings_ms=watch.timings_ms,
        )

    def _identify(self, data: bytes, index: int, salt: bytes, keep: float):
        """(content key, decoded image or None): bytes seen recently map straight to their key
        without decoding (they were decoded and validated then); others are decoded and keyed."""
        fingerprint = RecentKeys.fingerprint(data, salt, keep)
        key = self.recent.get(fingerprint)
        if key is not None:
            return key, None
        image = decode_image(data, index, self.config)
        key = self.encoder.key(image, salt, keep)
        self.recent.put(fingerprint, key)
        return key, image

    async def _decode_undecoded_misses(self, request, images: list, refs: list) -> None:
        """Decode the images that were keyed from their bytes alone but whose embedding is gone."""
        todo = [i for i, (image, ref) in enumerate(zip(images, refs)) if image is None and ref is None]
        decoded = await self.decoders.map(decode_image, [(request.images[i].data, i, self.config) for i in todo])
        for i, image in zip(todo, decoded):
            images[i] = image

    def _check_count(self, count: int) -> None:
        if count == 0:
            raise InvalidArgumentError("images: at least one image is required")
        if count > self.config.max_images_per_request:
            raise ResourceExhaustedError(
                f"images: {count} images exceeds max_images_per_request ({self.config.max_images_per_request})"
            )

    async def _encode_misses(self, images, keys, refs, keep: float, watch: Stopwatch) -> None:
        """Encode each distinct missing image once (batched with other requests' images, and shared
        with any request encoding the same image right now), publish it, fill its refs in place."""
        missing = {}
        for i, ref in enumerate(refs):
            if ref is None:
                missing.setdefault(keys[i], images[i])
        if not missing:
            return
        with watch.section("encode_ms"), tracing.span("encode.tower", {"epdserve.images": len(missing)}):
            done = await asyncio.gather(*(self.batcher.encode(k, image, keep) for k, image in missing.items()))
        watch.timings_ms["batch_size"] = float(max(e.batch_size for e in done))
        watch.timings_ms["batch_wait_ms"] = max(e.wait_s for e in done) * 1000.0
        watch.timings_ms["tower_ms"] = max(e.tower_s for e in done) * 1000.0
        watch.timings_ms["images_deduplicated"] = float(sum(e.shared for e in done))
        watch.timings_ms["images_encoded"] = float(sum(not e.shared for e in done))
        with watch.section("cache_put_ms"):
            published = await self.cache.put_many(
                [(key, e.tensor) for key, e in zip(missing, done)], ttl_s=self.config.embedding_ttl_s,
                lease_s=self.config.handoff_lease_s,
            )
        by_key = dict(zip(missing.keys(), published))
        for i, ref in enumerate(refs):
            if ref is None:
                refs[i] = by_key[keys[i]]


async def serve(server_config: ServerConfig, model_config: ModelConfig, cache_config: CacheConfig,
                encode_config: EncodeConfig, credentials: Credentials = NO_CREDENTIALS) -> None:
    register = encode_registrar(resolve_model_dir(model_config), model_config, cache_config, encode_config)
    await run_stage("encode", SERVICE_NAME, server_config, cache_config, register, credentials)


def colocated_encode(model_dir, model_config: ModelConfig, cache_config: CacheConfig,
                     encode_config: EncodeConfig) -> Colocated:
    """The encode stage as a second stage of another stage's process (`--with-encode`)."""
    return Colocated("encode", SERVICE_NAME, encode_registrar(model_dir, model_config, cache_config, encode_config))


def encode_registrar(model_dir, model_config: ModelConfig, cache_config: CacheConfig,
                     encode_config: EncodeConfig) -> Callable[[StageContext], None]:
    """Load the vision tower + projector now; the returned `register(ctx)` adds EncodeService to a
    stage process (the encode service's own, or a prefill process --with-encode)."""
    spec = load_spec(model_dir)
    revision = model_config.revision or model_revision(model_dir)
    scorer = build_scorer(encode_config.scorer, encode_config.predictor_path)
    digest = _file_digest(encode_config.predictor_path)
    encoder = ImageEncoder(spec, model_dir, revision, scorer, scorer_digest=digest, dtype=model_config.dtype,
                           device=model_config.device,
                           graph_batch=encode_config.max_batch_size if encode_config.cuda_graphs else 0)

    def register(ctx: StageContext) -> None:
        batcher = EncodeBatcher(encoder, ctx.executor, max_batch=encode_config.max_batch_size,
                                max_wait_ms=encode_config.max_batch_wait_ms, to_host=not cache_config.device_tier,
                                load=ctx.load)
        servicer = EncodeServicer(encoder, batcher, ctx.cache, encode_config, EncodeMetrics(ctx.metrics.registry))
        encode_pb2_grpc.add_EncodeServiceServicer_to_server(servicer, ctx.server.server)

    return register


def default_decode_threads() -> int:
    """Half the cores, at most 8. Image decoding holds the GIL for part of its time: past a few
    threads more only crowd the event loop and the model thread (which launches the tower) out of
    their turn at it (H100 host, 16 cores, batch 32: 2 threads 431 images/s, 4: 657, 16: 517)."""
    import os

    return max(1, min(8, len(os.sched_getaffinity(0)) // 2))


def _file_digest(path: str) -> str:
    if not path:
        return ""
    import hashlib
    import pathlib

    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    return stage_main("encode", EncodeConfig, serve, argv)
