"""Zero-work replicas (`--zero-work`): an encode, prefill or decode process that speaks the real
protocol (same servicers' RPCs, health, LoadService, ready file) but loads no model and computes
nothing, so `epdserve bench router` measures the router alone.

Contract: Encode answers one embedding ref per image with the checkpoint's image-token count;
Prefill answers first token `FILLER_TOKEN` and a KV handle of the prompt's length; Decode streams
max_new_tokens FILLER_TOKENs, one response per token. Refs point at nothing: only zero-work peers
may consume them. With a delay (`--zero-work-delay-ms`) each encode / prefill call takes that long,
decode waits that long before its first token (the hand-off) and between tokens; every call counts
in the replica's load report while it runs, so a cancelled call is seen leaving.
"""

from __future__ import annotations

import asyncio
import functools

from epdserve.config import CacheConfig, ModelConfig, ServerConfig
from epdserve.models.spec import load_spec
from epdserve.security import NO_CREDENTIALS, Credentials
from epdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    encode_pb2,
    encode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from services.load import LoadTracker
from services.runtime import Colocated, StageContext, resolve_model_dir, run_stage

FILLER_TOKEN = 5  # any id that is not a stop token of the tiny checkpoints


class _Zero:
    def __init__(self, load: LoadTracker, delay_s: float) -> None:
        self.load, self.delay_s = load, delay_s

    async def _work(self) -> None:
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)


class ZeroEncode(_Zero, encode_pb2_grpc.EncodeServiceServicer):
    def __init__(self, load: LoadTracker, delay_s: float, tokens_per_image: int, hidden: int) -> None:
        super().__init__(load, delay_s)
        self.tokens_per_image, self.hidden = tokens_per_image, hidden

    async def Encode(self, request: encode_pb2.EncodeRequest, context) -> encode_pb2.EncodeResponse:
        with self.load.request(len(request.images)):
            await self._work()
        ref = common_pb2.TensorRef(key="zero-work", shape=[self.tokens_per_image, self.hidden])
        return encode_pb2.EncodeResponse(images=[
            encode_pb2.ImageEmbedding(embedding=ref, num_tokens=self.tokens_per_image) for _ in request.images])


class ZeroPrefill(_Zero, prefill_pb2_grpc.PrefillServiceServicer):
    async def Prefill(self, request: prefill_pb2.PrefillRequest, context) -> prefill_pb2.PrefillResponse:
        with self.load.request(len(request.token_ids)):
            await self._work()
        kv = common_pb2.KVHandle(layers=[common_pb2.TensorRef(key="zero-work")], length=len(request.token_ids))
        return prefill_pb2.PrefillResponse(first_token_id=FILLER_TOKEN, kv=kv)


class ZeroDecode(_Zero, decode_pb2_grpc.DecodeServiceServicer):
    async def Decode(self, request: decode_pb2.DecodeRequest, context):
        with self.load.request(len(request.prompt.token_ids)):
            for i in range(request.max_new_tokens):
                await self._work()
                last = i == request.max_new_tokens - 1
                yield decode_pb2.DecodeResponse(token_ids=[FILLER_TOKEN], finish_reason="length" if last else "")
            if request.max_new_tokens == 0:
                yield decode_pb2.DecodeResponse(finish_reason="length")

    async def Abort(self, request: common_pb2.AbortRequest, context) -> common_pb2.AbortResponse:
        return common_pb2.AbortResponse(found=False)


async def serve_zero_work(stage: str, server_config: ServerConfig, model_config: ModelConfig,
                          cache_config: CacheConfig, stage_config, credentials: Credentials = NO_CREDENTIALS,
                          *also) -> None:
    """A zero-work `stage` replica; a prefill one --with-encode also answers Encode (E+P colocated)."""
    spec = load_spec(resolve_model_dir(model_config))
    delay_s = model_config.zero_work_delay_ms / 1000.0
    services = {
        "encode": (encode_pb2, "EncodeService", functools.partial(
            ZeroEncode, tokens_per_image=spec.tokens_per_image, hidden=spec.decoder.hidden_size),
            encode_pb2_grpc.add_EncodeServiceServicer_to_server),
        "prefill": (prefill_pb2, "PrefillService", ZeroPrefill, prefill_pb2_grpc.add_PrefillServiceServicer_to_server),
        "decode": (decode_pb2, "DecodeService", ZeroDecode, decode_pb2_grpc.add_DecodeServiceServicer_to_server),
    }

    def registration(served: str) -> Colocated:
        module, name, servicer, add = services[served]

        def register(ctx: StageContext) -> None:
            add(servicer(ctx.load, delay_s), ctx.server.server)

        return Colocated(served, module.DESCRIPTOR.services_by_name[name].full_name, register)

    own = registration(stage)
    colocated = (registration("encode"),) if getattr(stage_config, "with_encode", False) else ()
    await run_stage(stage, own.service_name, server_config, cache_config, own.register, credentials, colocated)
