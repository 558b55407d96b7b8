"""Typed errors shared by services, SDK and CLI.

Each class carries the gRPC status code name it maps to (`code`), so a service can
abort with the right status and the SDK can raise the same class on the client side.
This module imports nothing heavy (no grpc, no torch).
"""

from __future__ import annotations

RETRY_AFTER_METADATA = "retry-after-s"  # gRPC trailing metadata: seconds after which a retry may succeed


class EpdserveError(Exception):
    """Base class. `code` is a grpc.StatusCode name."""

    code = "INTERNAL"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidArgumentError(EpdserveError):
    code = "INVALID_ARGUMENT"


class NotFoundError(EpdserveError):
    code = "NOT_FOUND"


class AlreadyExistsError(EpdserveError):
    code = "ALREADY_EXISTS"


class FailedPreconditionError(EpdserveError):
    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(EpdserveError):
    code = "RESOURCE_EXHAUSTED"


class UnavailableError(EpdserveError):
    code = "UNAVAILABLE"


class EngineFailedError(UnavailableError):
    """A service's model engine failed for good; the process exits 1 to be restarted."""


class DeadlineExceededError(EpdserveError):
    code = "DEADLINE_EXCEEDED"


class RequestCancelledError(EpdserveError):
    code = "CANCELLED"


class UnauthenticatedError(EpdserveError):
    code = "UNAUTHENTICATED"


class PermissionDeniedError(EpdserveError):
    code = "PERMISSION_DENIED"


class InternalError(EpdserveError):
    code = "INTERNAL"


class ModelLoadError(FailedPreconditionError):
    """A checkpoint directory is missing, malformed, or does not match its config."""


ERRORS_BY_CODE: dict[str, type[EpdserveError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        RequestCancelledError,
        UnauthenticatedError,
        PermissionDeniedError,
        InternalError,
    )
}


def error_for_code(code_name: str, message: str) -> EpdserveError:
    """The typed error for a grpc.StatusCode name (unknown codes map to EpdserveError)."""
    return ERRORS_BY_CODE.get(code_name, EpdserveError)(message)
