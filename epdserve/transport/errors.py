"""Typed errors <-> gRPC status codes, for servers (abort) and clients (raise)."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from epdserve.errors import RETRY_AFTER_METADATA, EpdserveError, UnavailableError, error_for_code

log = logging.getLogger(__name__)
T = TypeVar("T")

INTERNAL_MESSAGE = "internal error (see the service log)"


def status_code(error: EpdserveError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


def from_rpc_error(exc: grpc.RpcError, *, peer: str = "") -> EpdserveError:
    """The typed error for a failed call (`peer` names the stage, e.g. "prefill"). From a peer,
    CANCELLED is UNAVAILABLE: the caller's own cancellation surfaces as asyncio.CancelledError, so a
    CANCELLED status means the peer cut the call (it is stopping, or its engine failed)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED) and peer:
        return UnavailableError(f"{peer} stage unavailable: {details}")
    error = error_for_code(code.name, details or code.name)
    error.retry_after_s = retry_after(exc)
    return error


def retry_after(exc: grpc.RpcError) -> float | None:
    """The server's retry hint (trailing metadata `retry-after-s`) of a failed call, if any."""
    try:
        trailing = exc.trailing_metadata() or ()
    except Exception:  # not every RpcError carries metadata
        return None
    for key, value in trailing:
        if key == RETRY_AFTER_METADATA:
            try:
                return float(value)
            except ValueError:
                return None
    return None


async def abort_for(exc: Exception, context: grpc.aio.ServicerContext, where: str) -> None:
    """End the RPC with the status that fits `exc`: typed errors carry their own; an unexpected
    error is logged and answered INTERNAL without details."""
    if isinstance(exc, grpc.aio.AbortError):  # the handler already chose its status
        raise exc
    if isinstance(exc, EpdserveError):
        if exc.retry_after_s is not None:
            context.set_trailing_metadata(((RETRY_AFTER_METADATA, f"{exc.retry_after_s:.3f}"),))
        await context.abort(status_code(exc), exc.message)
    if isinstance(exc, grpc.RpcError):
        err = from_rpc_error(exc)
        await context.abort(status_code(err), err.message)
    log.error("unhandled error in %s", where, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


def unary_errors(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorate a grpc.aio unary handler so every failure ends with a fitting status (`abort_for`)."""

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await handler(self, request, context)
        except Exception as exc:
            await abort_for(exc, context, handler.__qualname__)

    return wrapper


def stream_errors(handler: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """The streaming twin of `unary_errors` for async-generator handlers."""

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            async for item in handler(self, request, context):
                yield item
        except Exception as exc:
            await abort_for(exc, context, handler.__qualname__)

    return wrapper
