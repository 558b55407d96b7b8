"""Bearer-token authentication on gRPC: the interceptor every `ServiceServer` installs when a token
is configured, and the client interceptors every channel made with credentials carries.

Every method needs `authorization: Bearer <token>` except grpc.health.v1.Health (probes and the
router's health polling carry no secret). Reflection is not exempt: grpcurl sends the header
(`-H`). A refused call ends UNAUTHENTICATED before its request is parsed, with a message that
names the header and never echoes what was sent.
"""

from __future__ import annotations

import collections

import grpc

from epdserve.security import token_matches

AUTH_METADATA = "authorization"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
REFUSED_MESSAGE = "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')"


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(EXEMPT_PREFIXES):
            return handler
        if self.authorized(handler_call_details.invocation_metadata):
            return handler
        return _refusal(handler)

    def authorized(self, metadata) -> bool:
        values = [value for key, value in metadata or () if key == AUTH_METADATA]
        return len(values) == 1 and isinstance(values[0], str) and token_matches(values[0], self._token)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape that aborts UNAUTHENTICATED (no deserializer: the request is
    never parsed)."""
    async def refuse(request_or_iterator, context) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED_MESSAGE)

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(handler.request_streaming,
                                                                 handler.response_streaming)]
    return make(refuse)


class _AsyncToken:
    def __init__(self, token: str) -> None:
        self._header = (AUTH_METADATA, f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), self._header))


class _AsyncUnaryUnaryToken(_AsyncToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AsyncUnaryStreamToken(_AsyncToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AsyncStreamUnaryToken(_AsyncToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AsyncStreamStreamToken(_AsyncToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def async_token_interceptors(token: str) -> list:
    """Interceptors that add the token to every call of a grpc.aio channel. One per call kind: a
    grpc.aio channel files each interceptor under the first kind it implements."""
    return [kind(token) for kind in (_AsyncUnaryUnaryToken, _AsyncUnaryStreamToken, _AsyncStreamUnaryToken,
                                     _AsyncStreamStreamToken)]


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class SyncTokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the token to every call of a blocking channel (`grpc.intercept_channel`)."""

    def __init__(self, token: str) -> None:
        self._header = (AUTH_METADATA, f"Bearer {token}")

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(d.method, d.timeout, (*(d.metadata or ()), self._header), d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)
