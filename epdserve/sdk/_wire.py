"""SDK <-> proto conversion (internal)."""

from __future__ import annotations

import io
import os
import pathlib
from typing import Any, Union

import grpc

from epdserve.errors import EpdserveError, InvalidArgumentError, error_for_code
from epdserve.sdk.types import BatchItem, BatchSummary, GenerationChunk, GenerationResult, ModelInfo, Usage
from epdserve.transport.errors import retry_after
from epdserve.v1 import common_pb2, router_pb2

ImageLike = Union[bytes, bytearray, str, "os.PathLike[str]", Any]  # Any: a PIL.Image.Image


def image_bytes(image: ImageLike, index: int) -> bytes:
    """bytes / path / PIL image -> encoded bytes (PIL images are sent as PNG)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            return pathlib.Path(image).read_bytes()
        except OSError as exc:
            raise InvalidArgumentError(f"images[{index}]: cannot read {image}: {exc.strerror}") from None
    if hasattr(image, "save") and hasattr(image, "size"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise InvalidArgumentError(
        f"images[{index}]: expected bytes, a file path or a PIL image, got {type(image).__name__}"
    )


def build_request(prompt: str, images, *, max_tokens, temperature, top_k, top_p, seed, stop, ignore_eos, raw,
                  request_id, image_keep_ratio=None, fastkv=None) -> router_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams()
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    params = router_pb2.GenerationParams(sampling=sampling, stop=list(stop), ignore_eos=ignore_eos)
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if image_keep_ratio is not None:
        params.image_keep_ratio = image_keep_ratio
    if fastkv is not None:
        params.fastkv.CopyFrom(fastkv_settings(fastkv))
    request = router_pb2.GenerateRequest(
        request_id=request_id,
        images=[common_pb2.ImageInput(data=image_bytes(img, i)) for i, img in enumerate(images)],
        params=params,
        raw=raw,
    )
    try:
        request.prompt = prompt
    except (ValueError, UnicodeError):
        raise InvalidArgumentError("prompt: not valid UTF-8 text (lone surrogates or invalid code points)") from None
    return request


def typed_error(exc: grpc.RpcError) -> EpdserveError:
    """The typed error of a failed call, with the server's retry hint (RESOURCE_EXHAUSTED) if any."""
    code = exc.code()
    error = error_for_code(code.name if code is not None else "UNKNOWN", exc.details() or str(code))
    error.retry_after_s = retry_after(exc)
    return error


def error_event(error: router_pb2.Error) -> EpdserveError:
    names = {c.value[0]: c.name for c in grpc.StatusCode}
    return error_for_code(names.get(error.code, "UNKNOWN"), error.message)


class Accumulator:
    """Collects streamed events into a GenerationResult."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.result: GenerationResult | None = None

    def add(self, response: router_pb2.GenerateResponse) -> GenerationChunk | None:
        """Returns the chunk to hand to the caller (None for the final event); raises on an error event."""
        kind = response.WhichOneof("event")
        if kind == "chunk":
            self.text.append(response.chunk.text)
            self.token_ids.extend(response.chunk.token_ids)
            return GenerationChunk(response.chunk.text, tuple(response.chunk.token_ids))
        if kind == "error":
            raise error_event(response.error)
        done = response.complete
        self.result = GenerationResult(
            request_id=done.request_id or self.request_id,
            text="".join(self.text),
            token_ids=tuple(self.token_ids),
            finish_reason=done.finish_reason,
            usage=Usage(done.usage.prompt_tokens, done.usage.image_tokens, done.usage.completion_tokens),
            timings_ms=dict(done.timings_ms),
        )
        return None


def batch_event(event: router_pb2.BatchEvent) -> BatchItem | BatchSummary:
    if event.HasField("summary"):
        m = event.summary
        return BatchSummary(m.requests, m.failed, m.slots, m.predicted_makespan_s, m.lower_bound_s, m.makespan_s)
    r = event.result
    if r.HasField("error"):
        return BatchItem(r.index, None, error_event(r.error))
    c = r.complete
    usage = Usage(c.usage.prompt_tokens, c.usage.image_tokens, c.usage.completion_tokens)
    result = GenerationResult(c.request_id, r.text, tuple(r.token_ids), c.finish_reason, usage, dict(c.timings_ms))
    return BatchItem(r.index, result)


def model_info(msg: router_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model=msg.model, revision=msg.revision, max_context=msg.max_context,
        image_tokens_per_image=msg.image_tokens_per_image, image_placeholder=msg.image_placeholder,
        vocab_size=msg.vocab_size,
    )


def fastkv_settings(fastkv) -> common_pb2.FastKVSettings:
    """True / False / a dict of FastKVSettings fields (tsp_rate, retain_rate, tsp_length, kv_budget)."""
    if isinstance(fastkv, bool):
        return common_pb2.FastKVSettings(enabled=fastkv)
    if isinstance(fastkv, dict):
        unknown = set(fastkv) - {"tsp_rate", "retain_rate", "tsp_length", "kv_budget"}
        if unknown:
            raise InvalidArgumentError(f"fastkv: unknown setting(s) {', '.join(sorted(unknown))}")
        return common_pb2.FastKVSettings(enabled=True, **fastkv)
    raise InvalidArgumentError(f"fastkv: expected True, False or a dict of settings, got {type(fastkv).__name__}")
