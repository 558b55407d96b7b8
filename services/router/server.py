"""Router service: RouterService (Generate / Abort / GetModelInfo) over grpc.aio, and the optional
OpenAI-compatible HTTP front door (`openai_http.py`) in the same event loop.

Both front doors run a request through `RouterServicer.events`: its pipeline runs in a producer
task feeding a queue, so that Abort (cancel the producer) and a client disconnect (cancel the
handler, which closes the generator, which cancels the producer) both stop every downstream call.
Errors before the first chunk are raised (a gRPC status, an HTTP error status); errors after it
arrive in-band (a gRPC `error` event, an SSE error event). Past `--max-in-flight` online requests
(each Generate, each HTTP completion, each GenerateBatch call) the next is rejected at once with
RESOURCE_EXHAUSTED and a retry-after hint, before it is parsed: the router's memory stays bounded
under any overload.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import pathlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry

from epdserve import tracing
from epdserve.config import ModelConfig, RouterConfig, SecurityConfig, ServerConfig, TraceConfig
from epdserve.errors import (
    AlreadyExistsError,
    EpdserveError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from epdserve.models.checkpoint import model_revision
from epdserve.models.prompt import PromptBuilder
from epdserve.models.spec import load_spec
from epdserve.security import NO_CREDENTIALS, Credentials
from epdserve.transport.errors import INTERNAL_MESSAGE, status_code, stream_errors, unary_errors
from epdserve.transport.server import ServiceServer, run_until_signalled
from epdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.router.batch import BatchRunner
from services.router.metrics import RequestRecord, RouterMetrics
from services.router.orchestrator import Finished, Orchestrator, TextChunk
from services.router.requests import parse_request, tenant_salt
from services.runtime import parse_configs, resolve_model_dir, run_service, service_arg_parser

if TYPE_CHECKING:
    from services.router.openai_http import OpenAIHttpServer

log = logging.getLogger(__name__)
SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
_DONE = object()
TENANT_METADATA = "x-epdserve-tenant"
FULL_RETRY_AFTER_S = 1.0  # the retry hint when every --max-in-flight slot is taken


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, config: RouterConfig, orchestrator: Orchestrator, model_info: router_pb2.ModelInfo,
                 salt_secret: bytes = b"", metrics: RouterMetrics | None = None) -> None:
        self.config, self.orchestrator, self.model_info = config, orchestrator, model_info
        self.metrics = metrics or RouterMetrics()
        self.salt_secret = salt_secret
        self.active: dict[str, asyncio.Task] = {}
        self.aborted: set[str] = set()
        self.in_flight = 0  # online requests holding a --max-in-flight slot

    @stream_errors
    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        tenant = dict(context.invocation_metadata() or ()).get(TENANT_METADATA, "")
        caller = tracing.caller_span(context)
        async with contextlib.aclosing(self.events(request, tenant, context.time_remaining(), caller=caller)) as events:
            async for event in events:
                yield _to_proto(event, request.request_id)

    async def events(self, request: router_pb2.GenerateRequest, tenant: str = "", timeout_s: float | None = None,
                     decode_replica=None, caller=None, counted: bool = True
                     ) -> AsyncIterator[TextChunk | Finished | Failed]:
        """One request, whichever front door it came through: validate (`parse_request`), refuse a
        duplicate request id, tokenize, run the pipeline in a producer task until the deadline
        (`timeout_s`, default `request_timeout_s`).

        Yields TextChunk events, then exactly one Finished (finish_reason "abort" after Abort) or,
        when the pipeline fails after the first chunk, one Failed. `decode_replica` pins the decode
        replica (offline batch plans); None lets placement choose. Raises EpdserveError (or the
        unexpected exception) before the first chunk. An empty `request.request_id` is filled in
        with the id the router assigned. A consumer that stops early must close the generator
        (`contextlib.aclosing`): closing it cancels the producer and with it every downstream call.
        Each request is counted once in `self.metrics`, logged in one line when it ends and, with
        tracing on, is the root span `epdserve.request` of its trace (a child of `caller`, the
        client's span, when it sent one). A `counted` request holds a --max-in-flight slot while it
        runs (ResourceExhaustedError when none is free); the items of a batch are not counted.
        """
        record = self.metrics.begin()
        root = tracing.start_span("epdserve.request", {"epdserve.model": self.model_info.model}, parent=caller,
                                  kind="server")
        record.trace_id = tracing.trace_id(root)
        try:
            with self._slot(counted):
                async with contextlib.aclosing(self._events(request, tenant, timeout_s, decode_replica, record,
                                                            root)) as events:
                    async for event in events:
                        _note(record, event, root)
                        yield event
        except BaseException as exc:
            _end(record, root, exc)
            raise
        _end(record, root, None)

    @contextlib.contextmanager
    def _slot(self, counted: bool = True):
        """Hold one of the --max-in-flight slots until the block ends; raises ResourceExhaustedError
        (with the retry hint) when every slot is taken. Not counted, or no cap: a no-op."""
        cap = self.config.max_in_flight
        if not counted or cap == 0:
            yield
            return
        if self.in_flight >= cap:
            raise ResourceExhaustedError(f"the router is running its limit of {cap} requests (--max-in-flight); "
                                         f"retry after {FULL_RETRY_AFTER_S:.0f} s", retry_after_s=FULL_RETRY_AFTER_S)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _events(self, request: router_pb2.GenerateRequest, tenant: str, timeout_s: float | None,
                      decode_replica, record: RequestRecord, root) -> AsyncIterator[TextChunk | Finished | Failed]:
        req = parse_request(request, self.config, tenant_salt(self.salt_secret, tenant))
        request.request_id = req.request_id
        record.request_id, record.images = req.request_id, len(req.images)
        if req.request_id in self.active:
            raise AlreadyExistsError(f"request_id {req.request_id!r} is already running")
        prompt = self.orchestrator.tokenize(req)
        deadline = time.monotonic() + (timeout_s or self.config.request_timeout_s)
        queue: asyncio.Queue = asyncio.Queue()
        producer = asyncio.create_task(self._produce(req, prompt, deadline, queue, decode_replica, root))
        producer.add_done_callback(lambda _: queue.put_nowait(_DONE))
        self.active[req.request_id] = producer
        completion_tokens = 0
        try:
            async for event in _coalesced(queue):
                completion_tokens += len(event.token_ids) if isinstance(event, TextChunk) else 0
                yield event
            if req.request_id in self.aborted:
                yield Finished("abort", len(prompt.token_ids), prompt.image_tokens, completion_tokens, {})
            elif not producer.cancelled() and producer.exception() is not None:
                if completion_tokens == 0:
                    raise producer.exception()
                yield Failed(_typed(producer.exception()))
        finally:
            producer.cancel()
            self.active.pop(req.request_id, None)
            self.aborted.discard(req.request_id)

    async def _produce(self, req, prompt, deadline: float, queue: asyncio.Queue, decode_replica=None,
                       root=tracing.NO_SPAN) -> None:
        with tracing.use(root):  # the request's spans (stage calls, placement) are children of its root
            async for event in self.orchestrator.generate(req, prompt, deadline, decode_replica):
                queue.put_nowait(event)

    @stream_errors
    async def GenerateBatch(self, request: router_pb2.BatchRequest, context: grpc.aio.ServicerContext):
        if len(request.requests) > self.config.max_batch_requests:
            raise InvalidArgumentError(f"requests: {len(request.requests)} requests exceed the limit of "
                                       f"{self.config.max_batch_requests} (--max-batch-requests)")
        tenant = dict(context.invocation_metadata() or ()).get(TENANT_METADATA, "")
        runner = BatchRunner(self.orchestrator, functools.partial(self.events, counted=False),
                             tenant_salt(self.salt_secret, tenant))
        with self._slot():
            async with contextlib.aclosing(runner.run(request.requests, tenant, context.time_remaining())) as events:
                async for event in events:
                    yield event

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


def _end(record: RequestRecord, root, exc: BaseException | None) -> None:
    """The request ended: count and log it, end its root span with how it went."""
    outcome, code = record.end(exc)
    attributes = None
    if root.is_recording():
        attributes = {"epdserve.request_id": record.request_id, "epdserve.outcome": outcome, "epdserve.code": code,
                      "epdserve.path": record.path or "-", "epdserve.images": record.images,
                      "epdserve.prompt_tokens": record.prompt_tokens,
                      "epdserve.completion_tokens": record.completion_tokens}
    tracing.end_span(root, exc, attributes)


def _note(record: RequestRecord, event: TextChunk | Finished | Failed, root) -> None:
    if isinstance(event, TextChunk):
        if record.first_at is None:
            root.add_event("first_token")
        record.chunk(len(event.token_ids))
    elif isinstance(event, Finished):
        record.finished(event)
    else:
        record.failed(event.error.code)


async def _coalesced(queue: asyncio.Queue) -> AsyncIterator:
    """The producer's events until _DONE, with the text chunks already waiting merged into one: a
    consumer slower than token production gets fewer, larger messages, never a later one."""
    held = None
    while True:
        event = held if held is not None else await queue.get()
        held = None
        if event is _DONE:
            return
        while isinstance(event, TextChunk) and not queue.empty():
            following = queue.get_nowait()
            if not isinstance(following, TextChunk):
                held = following
                break
            event = TextChunk(event.text + following.text, event.token_ids + following.token_ids)
        yield event


@dataclasses.dataclass(frozen=True)
class Failed:
    """The pipeline failed after the first chunk: the stream has begun, so the error travels in-band.
    `error` is typed; an unexpected failure is logged and becomes InternalError without details."""

    error: EpdserveError


def _typed(exc: BaseException) -> EpdserveError:
    if isinstance(exc, EpdserveError):
        return exc
    log.error("generation failed", exc_info=exc)
    return InternalError(INTERNAL_MESSAGE)


def _to_proto(event: TextChunk | Finished | Failed, request_id: str) -> router_pb2.GenerateResponse:
    if isinstance(event, TextChunk):
        return router_pb2.GenerateResponse(chunk=router_pb2.Chunk(text=event.text, token_ids=event.token_ids))
    if isinstance(event, Failed):
        return router_pb2.GenerateResponse(
            error=router_pb2.Error(code=status_code(event.error).value[0], message=event.error.message))
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


def build_model_info(model_dir, spec, prompts: PromptBuilder, revision: str) -> router_pb2.ModelInfo:
    return router_pb2.ModelInfo(
        model=model_dir.name,
        revision=revision,
        max_context=spec.decoder.max_context,
        image_tokens_per_image=spec.tokens_per_image,
        image_placeholder=prompts.placeholder,
        vocab_size=spec.decoder.vocab_size,
    )


async def serve(server_config: ServerConfig, model_config: ModelConfig, router_config: RouterConfig,
                credentials: Credentials = NO_CREDENTIALS) -> None:
    model_dir = resolve_model_dir(model_config)
    spec = load_spec(model_dir)
    prompts = PromptBuilder(spec)
    revision = model_config.revision or model_revision(model_dir)
    orchestrator = Orchestrator(router_config, prompts, credentials=credentials)
    secret = read_secret(router_config.tenant_salt_file)
    metrics = RouterMetrics()  # its registry is the one the server's /metrics serves
    servicer = RouterServicer(router_config, orchestrator, build_model_info(model_dir, spec, prompts, revision), secret,
                              metrics)
    http = None
    if router_config.http_port >= 0:
        from services.router.openai_http import OpenAIHttpServer  # aiohttp is imported only when enabled

        http = OpenAIHttpServer(router_config, server_config, servicer, prompts, token=credentials.token)
    server = RouterServer(server_config, [SERVICE_NAME], http, metrics.registry, credentials)
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server.server)
    await orchestrator.start()
    await run_until_signalled(server, orchestrator.close)


class RouterServer(ServiceServer):
    """The router's gRPC server with the HTTP front door beside it (when enabled): the HTTP server
    starts first, so the ready file also holds `http_address`, and both drain together."""

    def __init__(self, config: ServerConfig, service_names, http: OpenAIHttpServer | None = None,
                 registry: CollectorRegistry | None = None, credentials: Credentials = NO_CREDENTIALS) -> None:
        super().__init__(config, service_names, registry, credentials)
        self.http = http
        self.http_address = ""

    async def start(self) -> str:
        if self.http is not None:
            self.http_address = await self.http.start()
        return await super().start()

    def ready_info(self) -> dict:
        info = super().ready_info()
        if self.http_address:
            info["http_address"] = self.http_address
        return info

    async def stop(self) -> None:
        if self.http is None:
            await super().stop()
        else:
            await asyncio.gather(super().stop(), self.http.stop())


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
    *configs, trace = parse_configs(parser, argv, ServerConfig, ModelConfig, RouterConfig, SecurityConfig, TraceConfig)
    return run_service(serve, tuple(configs), "router", trace)
