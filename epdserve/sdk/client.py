"""Client and AsyncClient: what users import to talk to an epdserve router.

    from epdserve.sdk import Client
    with Client("127.0.0.1:50051") as client:
        result = client.generate("What is in this picture?", images=["cat.png"], max_tokens=32)
        for chunk in client.stream("Describe it", images=["cat.png"]):
            print(chunk.text, end="")

A secured deployment (docs/RELIABILITY.md) takes its token and, with mutual TLS, this client's
certificate and key plus the CA that signed the router's:

    Client("router:50051", token=open("token").read().strip(),
           tls=TLSFiles(cert="client.crt", key="client.key", ca="ca.crt"))

Failures raise typed errors from `epdserve.errors` (InvalidArgumentError, ResourceExhaustedError,
UnavailableError, DeadlineExceededError, ...), mapped from gRPC status codes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc

from epdserve.errors import InvalidArgumentError
from epdserve.sdk import _wire
from epdserve.sdk.types import BatchItem, BatchSummary, GenerationChunk, GenerationResult, ModelInfo
from epdserve.security import Credentials, TLSFiles
from epdserve.transport.channels import DEFAULT_MAX_MESSAGE_BYTES, aio_channel, sync_channel
from epdserve.v1 import common_pb2, router_pb2, router_pb2_grpc


def _request(prompt, images, kwargs) -> router_pb2.GenerateRequest:
    request_id = kwargs.pop("request_id", None) or uuid.uuid4().hex
    fields = dict(max_tokens=None, temperature=None, top_k=None, top_p=None, seed=None, stop=(),
                  ignore_eos=False, raw=False, image_keep_ratio=None, fastkv=None)
    unknown = set(kwargs) - set(fields)
    if unknown:
        raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
    fields.update(kwargs)
    return _wire.build_request(prompt, images, request_id=request_id, **fields)


def _batch_request(index: int, fields: dict) -> router_pb2.GenerateRequest:
    if "prompt" not in fields:
        raise InvalidArgumentError(f"requests[{index}]: no prompt")
    return _request(fields.pop("prompt"), fields.pop("images", ()), fields)


def _tenant_metadata(tenant: str | None) -> tuple[tuple[str, str], ...]:
    """The tenant id travels as metadata; the router turns it into a secret cache salt."""
    return (("x-epdserve-tenant", tenant),) if tenant else ()


class _StreamBase:
    def __init__(self, call, request_id: str) -> None:
        self._call = call
        self._acc = _wire.Accumulator(request_id)
        self.request_id = request_id

    @property
    def result(self) -> GenerationResult:
        """The whole generation (text, token ids, finish reason, usage, timings), once iterated."""
        if self._acc.result is None:
            raise RuntimeError("the stream has not finished")
        return self._acc.result

    def cancel(self) -> None:
        self._call.cancel()


class GenerationStream(_StreamBase):
    """Iterate for GenerationChunk; afterwards `.result` holds the GenerationResult."""

    def __iter__(self) -> Iterator[GenerationChunk]:
        try:
            for response in self._call:
                chunk = self._acc.add(response)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as exc:
            raise _wire.typed_error(exc) from None


class Client:
    """Blocking client. Keyword arguments of generate()/stream(): max_tokens, temperature, top_k,
    top_p, seed, stop (list of strings), ignore_eos, raw (prompt holds its own image placeholders),
    image_keep_ratio (fraction of each image's tokens kept, (0, 1]), fastkv (True / False / a dict of
    tsp_rate, retain_rate, tsp_length, kv_budget: lossy FastKV prefill for long prompts), request_id.
    Images: bytes, file paths or PIL images, in prompt order. `tenant` names the
    caller's tenant (cache isolation when the router has a tenant secret). `token`: the
    deployment's bearer token, sent with every call; `tls`: this client's certificate and key and
    the deployment's CA (mutual TLS)."""

    def __init__(self, address: str, *, timeout_s: float | None = 600.0, tenant: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, token: str | None = None,
                 tls: TLSFiles | None = None) -> None:
        self.timeout_s = timeout_s
        self._metadata = _tenant_metadata(tenant)
        self._channel = sync_channel(address, max_message_bytes, Credentials((token or "").strip(), tls))
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)

    def stream(self, prompt: str, *, images: Sequence = (), **kwargs) -> GenerationStream:
        request = _request(prompt, images, kwargs)
        call = self._stub.Generate(request, timeout=self.timeout_s, metadata=self._metadata)
        return GenerationStream(call, request.request_id)

    def generate(self, prompt: str, *, images: Sequence = (), **kwargs) -> GenerationResult:
        stream = self.stream(prompt, images=images, **kwargs)
        for _ in stream:
            pass
        return stream.result

    def batch(self, requests: Sequence[dict]) -> Iterator[BatchItem | BatchSummary]:
        """An offline batch job: `requests` are dicts of `generate`'s arguments (`prompt`, `images`,
        `max_tokens`, ...). The router packs them onto its decode replicas to minimise the makespan
        and yields each BatchItem as it finishes (any order: `.index` says which), then one
        BatchSummary (measured makespan next to the plan's lower bound)."""
        batch = router_pb2.BatchRequest(requests=[_batch_request(i, dict(r)) for i, r in enumerate(requests)])
        call = self._stub.GenerateBatch(batch, timeout=self.timeout_s, metadata=self._metadata)
        try:
            for event in call:
                yield _wire.batch_event(event)
        except grpc.RpcError as exc:
            raise _wire.typed_error(exc) from None

    def abort(self, request_id: str) -> bool:
        try:
            return self._stub.Abort(common_pb2.AbortRequest(request_id=request_id), timeout=self.timeout_s).found
        except grpc.RpcError as exc:
            raise _wire.typed_error(exc) from None

    def model_info(self) -> ModelInfo:
        try:
            return _wire.model_info(self._stub.GetModelInfo(router_pb2.GetModelInfoRequest(), timeout=self.timeout_s))
        except grpc.RpcError as exc:
            raise _wire.typed_error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGenerationStream(_StreamBase):
    """`async for` GenerationChunk; afterwards `.result` holds the GenerationResult."""

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        try:
            async for response in self._call:
                chunk = self._acc.add(response)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as exc:
            raise _wire.typed_error(exc) from None


class AsyncClient:
    """asyncio twin of Client (same arguments); use inside a running event loop."""

    def __init__(self, address: str, *, timeout_s: float | None = 600.0, tenant: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, token: str | None = None,
                 tls: TLSFiles | None = None) -> None:
        self.timeout_s = timeout_s
        self._metadata = _tenant_metadata(tenant)
        self._channel = aio_channel(address, max_message_bytes, Credentials((token or "").strip(), tls))
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)

    def stream(self, prompt: str, *, images: Sequence = (), **kwargs) -> AsyncGenerationStream:
        request = _request(prompt, images, kwargs)
        call = self._stub.Generate(request, timeout=self.timeout_s, metadata=self._metadata)
        return AsyncGenerationStream(call, request.request_id)

    async def generate(self, prompt: str, *, images: Sequence = (), **kwargs) -> GenerationResult:
        stream = self.stream(prompt, images=images, **kwargs)
        async for _ in stream:
            pass
        return stream.result

    async def abort(self, request_id: str) -> bool:
        try:
            response = await self._stub.Abort(common_pb2.AbortRequest(request_id=request_id), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise _wire.typed_error(exc) from None
        return response.found

    async def model_info(self) -> ModelInfo:
        try:
            msg = await self._stub.GetModelInfo(router_pb2.GetModelInfoRequest(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise _wire.typed_error(exc) from None
        return _wire.model_info(msg)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
