"""The router's OpenAI-compatible HTTP front door (aiohttp, in the router's event loop).

POST /v1/chat/completions, GET /v1/models, GET /health. With a token (--auth-token-file) every
path but /health needs `Authorization: Bearer <token>` (else 401 in OpenAI's error shape, the
token never echoed); the front door itself is plain HTTP (terminate TLS for clients at the
ingress / load balancer, docs/RELIABILITY.md). A chat request is checked and converted
(`openai_protocol.py`), its whole conversation rendered with the checkpoint's chat template,
allowlisted remote images fetched, and then it runs through `RouterServicer.events`: the path gRPC
Generate takes, so validation, limits, Abort and deadlines are the same. A client that disconnects
cancels its handler (aiohttp handler cancellation), which closes the event generator and with it
the generation downstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
import jinja2
from aiohttp import web

from epdserve import tracing
from epdserve.config import MiB, RouterConfig, ServerConfig
from epdserve.errors import (
    EpdserveError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from epdserve.models.prompt import PromptBuilder
from epdserve.security import token_matches
from epdserve.transport.errors import INTERNAL_MESSAGE
from services.router.openai_protocol import (
    ChatRequest,
    ChunkStream,
    ImageSource,
    completion,
    error_body,
    generate_request,
    parse_chat,
    parse_json,
    plain_error,
)
from services.router.orchestrator import Finished, TextChunk
from services.router.server import TENANT_METADATA, Failed, RouterServicer

log = logging.getLogger(__name__)
IMAGE_FETCH_TIMEOUT_S = 10.0   # one allowlisted remote image, connect to last byte
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIHttpServer:
    def __init__(self, config: RouterConfig, server_config: ServerConfig, servicer: RouterServicer,
                 prompts: PromptBuilder, token: str = "") -> None:
        if not -1 <= config.http_port < 65536:
            raise FailedPreconditionError(f"http_port must be -1 (off) or in [0, 65535] (got {config.http_port})")
        self.config, self.servicer, self.prompts = config, servicer, prompts
        self.model = config.served_model_name or servicer.model_info.model
        self.advertise_host = server_config.advertise_host or config.http_host
        self.drain_timeout_s = server_config.drain_timeout_s
        self.created = int(time.time())
        self.serving = False
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        # a body may carry what one gRPC message may, base64 encoded
        middlewares = [_openai_errors, _bearer_auth(token)] if token else [_openai_errors]
        self.app = web.Application(client_max_size=server_config.max_message_bytes * 4 // 3 + MiB,
                                   middlewares=middlewares)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)

    async def start(self) -> str:
        """Bind and serve; returns the advertised host:port (port 0 = a free one)."""
        self._runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=self.drain_timeout_s)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.config.http_host, self.config.http_port).start()
        if self.config.image_url_allowlist:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=IMAGE_FETCH_TIMEOUT_S))
        self.serving = True
        port = self._runner.addresses[0][1]
        address = f"[{self.advertise_host}]:{port}" if ":" in self.advertise_host else f"{self.advertise_host}:{port}"
        log.info("serving OpenAI-compatible HTTP on http://%s (model %r)", address, self.model)
        return address

    async def stop(self) -> None:
        """Stop accepting, give in-flight requests the drain timeout, then cancel the rest."""
        self.serving = False
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def health(self, request: web.Request) -> web.Response:
        if self.serving:
            return web.json_response({"status": "serving"})
        return web.json_response({"status": "draining"}, status=503)

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.model, "object": "model", "created": self.created, "owned_by": "epdserve",
                "max_model_len": self.servicer.model_info.max_context}
        return web.json_response({"object": "list", "data": [card]})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        names: dict[str, str] = {}
        try:
            if not self.serving:
                raise UnavailableError("the router is shutting down")
            chat = parse_chat(parse_json(await request.read()), model=self.model,
                              allowlist=self.config.image_url_allowlist, max_image_bytes=self.config.max_image_bytes,
                              placeholder=self.prompts.placeholder)
            names = chat.field_names
            generate = generate_request(chat, self._render(chat.messages), await self._images(chat.images))
            events = self.servicer.events(generate, request.headers.get(TENANT_METADATA, ""),
                                          caller=tracing.remote_span(request.headers))
            async with contextlib.aclosing(events) as events:
                if chat.stream:
                    return await self._stream(request, chat, events)
                return await self._complete(chat, events)
        except EpdserveError as exc:
            return error_response(exc, names)

    async def _complete(self, chat: ChatRequest, events) -> web.Response:
        texts: list[str] = []
        finished = None
        async for event in events:
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, TextChunk):
                texts.append(event.text)
            elif isinstance(event, Finished):
                finished = event
        return web.json_response(completion(chat, int(time.time()), "".join(texts), finished))

    async def _stream(self, request: web.Request, chat: ChatRequest, events) -> web.StreamResponse:
        first = await anext(events)  # errors before the first chunk still get an HTTP error status
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        chunks = ChunkStream(chat, int(time.time()))
        try:
            await response.write(chunks.first())
            for payload in chunks.payloads(first):
                await response.write(payload)
            async for event in events:
                for payload in chunks.payloads(event):
                    await response.write(payload)
            await response.write_eof()
        except ConnectionResetError:  # the client went away; closing `events` cancels the generation
            log.info("client of %s disconnected mid-stream", chat.request_id)
        return response

    def _render(self, messages: list[dict]) -> str:
        """The conversation as the checkpoint's chat template writes it, ready for the assistant's turn."""
        tokenizer = self.prompts.tokenizer
        if not tokenizer.chat_template:
            raise InvalidArgumentError("messages: this checkpoint has no chat template, so chat messages cannot be "
                                       "rendered (use the gRPC API with raw=true)")
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError as exc:
            raise InvalidArgumentError(f"messages: the checkpoint's chat template refused them ({exc})") from None

    async def _images(self, sources: tuple[ImageSource, ...]) -> list[bytes]:
        return list(await asyncio.gather(*(self._fetch(s) if s.url else _given(s.data) for s in sources)))

    async def _fetch(self, source: ImageSource) -> bytes:
        """An allowlisted remote image: no redirects, at most max_image_bytes, IMAGE_FETCH_TIMEOUT_S."""
        cap = self.config.max_image_bytes
        assert self._session is not None  # parse_chat accepts remote URLs only when there is an allowlist
        try:
            async with self._session.get(source.url, allow_redirects=False) as response:
                if response.status != 200:
                    raise InvalidArgumentError(f"{source.field}: fetching the image gave HTTP {response.status}")
                data = bytearray()
                async for block in response.content.iter_chunked(1 << 16):
                    data += block
                    if len(data) > cap:
                        raise ResourceExhaustedError(f"{source.field}: the image exceeds max_image_bytes ({cap})")
                return bytes(data)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise InvalidArgumentError(f"{source.field}: cannot fetch the image ({type(exc).__name__})") from None


async def _given(data: bytes) -> bytes:
    return data


def error_response(error: EpdserveError, field_names: dict[str, str]) -> web.Response:
    status, body, headers = error_body(error, field_names)
    return web.json_response(body, status=status, headers=headers)


UNAUTHENTICATED_MESSAGE = "missing or invalid API key (send the header 'Authorization: Bearer <token>')"
AUTH_EXEMPT_PATHS = ("/health",)


def _bearer_auth(token: str):
    """Every path but /health needs the deployment's token (compared in constant time)."""
    @web.middleware
    async def bearer_auth(request: web.Request, handler) -> web.StreamResponse:
        if request.path in AUTH_EXEMPT_PATHS or token_matches(request.headers.get("Authorization", ""), token):
            return await handler(request)
        response = error_response(UnauthenticatedError(UNAUTHENTICATED_MESSAGE), {})
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    return bearer_auth


@web.middleware
async def _openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error in OpenAI's shape: aiohttp's own (no route 404, wrong method 405, body too large
    413), typed errors, and unexpected ones (500, logged, no details)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return web.json_response(plain_error(exc.status, exc.text or exc.reason), status=exc.status, headers=allow)
    except EpdserveError as exc:
        return error_response(exc, {})
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return web.json_response(plain_error(500, INTERNAL_MESSAGE), status=500)
