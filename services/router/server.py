"""Router service: RouterService (Generate / Abort / GetModelInfo) over grpc.aio.

Each Generate runs its pipeline in a producer task feeding a queue, so that Abort (cancel the
producer) and a client disconnect (cancel the handler, which cancels the producer) both stop
every downstream call. Errors before the first chunk end the RPC with a gRPC status; errors
after it arrive in-band as an `error` event.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time

import grpc

from epdserve.config import ModelConfig, RouterConfig, ServerConfig
from epdserve.errors import AlreadyExistsError, EpdserveError, FailedPreconditionError, InternalError
from epdserve.models.checkpoint import model_revision
from epdserve.models.prompt import PromptBuilder
from epdserve.models.spec import load_spec
from epdserve.transport.errors import INTERNAL_MESSAGE, status_code, stream_errors, unary_errors
from epdserve.transport.server import ServiceServer, run_until_signalled
from epdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.router.orchestrator import Finished, Orchestrator, TextChunk
from services.router.requests import parse_request, tenant_salt
from services.runtime import parse_configs, resolve_model_dir, run_service, service_arg_parser

log = logging.getLogger(__name__)
SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
_DONE = object()
TENANT_METADATA = "x-epdserve-tenant"


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, config: RouterConfig, orchestrator: Orchestrator, model_info: router_pb2.ModelInfo,
                 salt_secret: bytes = b"") -> None:
        self.config, self.orchestrator, self.model_info = config, orchestrator, model_info
        self.salt_secret = salt_secret
        self.active: dict[str, asyncio.Task] = {}
        self.aborted: set[str] = set()

    @stream_errors
    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        tenant = dict(context.invocation_metadata() or ()).get(TENANT_METADATA, "")
        req = parse_request(request, self.config, tenant_salt(self.salt_secret, tenant))
        if req.request_id in self.active:
            raise AlreadyExistsError(f"request_id {req.request_id!r} is already running")
        prompt = self.orchestrator.tokenize(req)
        timeout = context.time_remaining() or self.config.request_timeout_s
        queue: asyncio.Queue = asyncio.Queue()
        producer = asyncio.create_task(self._produce(req, prompt, time.monotonic() + timeout, queue))
        producer.add_done_callback(lambda _: queue.put_nowait(_DONE))
        self.active[req.request_id] = producer
        completion_tokens = 0
        try:
            while (event := await queue.get()) is not _DONE:
                completion_tokens += len(event.token_ids) if isinstance(event, TextChunk) else 0
                yield _to_proto(event, req.request_id)
            if req.request_id in self.aborted:
                yield _aborted(req.request_id, len(prompt.token_ids), prompt.image_tokens, completion_tokens)
            elif not producer.cancelled() and producer.exception() is not None:
                if completion_tokens == 0:
                    raise producer.exception()
                yield _error_event(producer.exception())
        finally:
            producer.cancel()
            self.active.pop(req.request_id, None)
            self.aborted.discard(req.request_id)

    async def _produce(self, req, prompt, deadline: float, queue: asyncio.Queue) -> None:
        async for event in self.orchestrator.generate(req, prompt, deadline):
            queue.put_nowait(event)

    @unary_errors
    async def Abort(self, request: common_pb2.AbortRequest, context) -> common_pb2.AbortResponse:
        task = self.active.get(request.request_id)
        if task is None or task.done():
            return common_pb2.AbortResponse(found=False)
        self.aborted.add(request.request_id)
        task.cancel()
        return common_pb2.AbortResponse(found=True)

    @unary_errors
    async def GetModelInfo(self, request, context) -> router_pb2.ModelInfo:
        return self.model_info


def _to_proto(event, request_id: str) -> router_pb2.GenerateResponse:
    if isinstance(event, TextChunk):
        return router_pb2.GenerateResponse(chunk=router_pb2.Chunk(text=event.text, token_ids=event.token_ids))
    assert isinstance(event, Finished)
    return router_pb2.GenerateResponse(
        complete=router_pb2.Complete(
            request_id=request_id,
            finish_reason=event.finish_reason,
            usage=router_pb2.Usage(
                prompt_tokens=event.prompt_tokens,
                image_tokens=event.image_tokens,
                completion_tokens=event.completion_tokens,
            ),
            timings_ms=event.timings_ms,
        )
    )


def _aborted(request_id: str, prompt_tokens: int, image_tokens: int, completion_tokens: int):
    usage = router_pb2.Usage(
        prompt_tokens=prompt_tokens, image_tokens=image_tokens, completion_tokens=completion_tokens
    )
    return router_pb2.GenerateResponse(
        complete=router_pb2.Complete(request_id=request_id, finish_reason="abort", usage=usage)
    )


def _error_event(exc: BaseException) -> router_pb2.GenerateResponse:
    if not isinstance(exc, EpdserveError):
        log.error("generation failed", exc_info=exc)
        exc = InternalError(INTERNAL_MESSAGE)
    return router_pb2.GenerateResponse(error=router_pb2.Error(code=status_code(exc).value[0], message=exc.message))


def build_model_info(model_dir, spec, prompts: PromptBuilder, revision: str) -> router_pb2.ModelInfo:
    return router_pb2.ModelInfo(
        model=model_dir.name,
        revision=revision,
        max_context=spec.decoder.max_context,
        image_tokens_per_image=spec.tokens_per_image,
        image_placeholder=prompts.placeholder,
        vocab_size=spec.decoder.vocab_size,
    )


async def serve(server_config: ServerConfig, model_config: ModelConfig, router_config: RouterConfig) -> None:
    model_dir = resolve_model_dir(model_config)
    spec = load_spec(model_dir)
    prompts = PromptBuilder(spec)
    revision = model_config.revision or model_revision(model_dir)
    orchestrator = Orchestrator(router_config, prompts)
    secret = read_secret(router_config.tenant_salt_file)
    servicer = RouterServicer(router_config, orchestrator, build_model_info(model_dir, spec, prompts, revision), secret)
    server = ServiceServer(server_config, [SERVICE_NAME])
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server.server)
    await run_until_signalled(server, orchestrator.close)


def read_secret(path: str) -> bytes:
    if not path:
        return b""
    try:
        secret = pathlib.Path(path).read_bytes().strip()
    except OSError as exc:
        raise FailedPreconditionError(f"tenant_salt_file: cannot read it ({exc.strerror})") from None
    if len(secret) < 16:
        raise FailedPreconditionError("tenant_salt_file: the secret must be at least 16 bytes")
    return secret


def main(argv: list[str] | None = None) -> int:
    parser = service_arg_parser("router", RouterConfig, with_cache=False)
    configs = parse_configs(parser, argv, ServerConfig, ModelConfig, RouterConfig)
    return run_service(serve, configs)
