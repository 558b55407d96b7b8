"""The epdserve Python SDK: `Client` / `AsyncClient` with `generate()` and `stream()`.

Results are plain dataclasses; failures raise the typed errors of `epdserve.errors`.
"""

from epdserve.errors import (
    DeadlineExceededError,
    EpdserveError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    RequestCancelledError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from epdserve.sdk.client import AsyncClient, AsyncGenerationStream, Client, GenerationStream
from epdserve.sdk.types import BatchItem, BatchSummary, GenerationChunk, GenerationResult, ModelInfo, Usage
from epdserve.security import TLSFiles

__all__ = [
    "AsyncClient", "AsyncGenerationStream", "BatchItem", "BatchSummary", "Client", "DeadlineExceededError",
    "EpdserveError", "FailedPreconditionError", "GenerationChunk", "GenerationResult", "GenerationStream",
    "InternalError", "InvalidArgumentError", "ModelInfo", "NotFoundError", "RequestCancelledError",
    "ResourceExhaustedError", "TLSFiles", "UnauthenticatedError", "UnavailableError", "Usage",
]
