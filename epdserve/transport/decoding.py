"""Requests gRPC cannot parse end INVALID_ARGUMENT, not UNKNOWN.

grpc.aio runs a method's request deserializer before any handler and answers a parse failure
(for example invalid UTF-8 in a proto3 string field, sent by a client that skips the SDK) with
UNKNOWN "Unexpected <class DecodeError>". `StrictDecodingInterceptor` gives every unary-request
method a deserializer that turns the failure into an `Undecodable` marker and a behaviour that
aborts INVALID_ARGUMENT on the marker, naming the message type. Wrapped handlers are built once
per method. Streaming-request methods are left as they are (none of the public ones stream
requests).
"""

from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError


class Undecodable:
    """What the lenient deserializer returns for bytes that do not parse."""

    __slots__ = ()


UNDECODABLE = Undecodable()


class StrictDecodingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # registered methods only

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:  # unknown method: UNIMPLEMENTED, and nothing remembered (names are client-chosen)
                return None
            wrapped = self._wrapped[method] = strict_handler(handler, method)
        return wrapped


def strict_handler(handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler | None:
    """`handler` with a parse failure mapped to INVALID_ARGUMENT (unchanged when it has no
    deserializer, streams its requests, or its behaviour is neither a coroutine nor an async
    generator function)."""
    if handler is None or handler.request_streaming or handler.request_deserializer is None:
        return handler
    message = f"request: not a valid {method.rsplit('/', 1)[-1]} message (bad wire encoding, or a string " \
              "field that is not UTF-8)"
    if handler.response_streaming:
        behavior = handler.unary_stream
        if not inspect.isasyncgenfunction(behavior):
            return handler

        async def unary_stream(request, context):
            if request is UNDECODABLE:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            async for response in behavior(request, context):
                yield response
        return handler._replace(request_deserializer=_lenient(handler.request_deserializer), unary_stream=unary_stream)
    behavior = handler.unary_unary
    if not inspect.iscoroutinefunction(behavior):
        return handler

    async def unary_unary(request, context):
        if request is UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        return await behavior(request, context)
    return handler._replace(request_deserializer=_lenient(handler.request_deserializer), unary_unary=unary_unary)


def _lenient(deserialize):
    def parse(data: bytes):
        try:
            return deserialize(data)
        except DecodeError:
            return UNDECODABLE
    return parse
