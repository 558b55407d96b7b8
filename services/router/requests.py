"""A Generate request, validated into a typed value before any stage is touched.

Every rejection is INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for size caps) with a message that
names the field and the limit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
import uuid

from epdserve.config import RouterConfig
from epdserve.engine.sampler import SamplingParams
from epdserve.errors import InvalidArgumentError, ResourceExhaustedError
from epdserve.v1 import common_pb2, router_pb2
from services.wire import fastkv_from_proto, sampling_from_proto

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str
    images: tuple[bytes, ...]
    raw: bool
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    ignore_eos: bool
    image_keep_ratio: float = 1.0
    fastkv: common_pb2.FastKVSettings | None = None  # validated; None: the prefill deployment's default
    cache_salt: bytes = b""    # per-tenant secret for cache keys (derived by the router, never by the client)


def tenant_salt(secret: bytes, tenant: str) -> bytes:
    """The cache salt of a tenant: HMAC(server secret, tenant id). Without a secret every tenant
    shares one cache namespace (a single-tenant deployment)."""
    if not secret:
        return b""
    return hmac.new(secret, tenant.encode(), hashlib.sha256).digest()


def parse_request(msg: router_pb2.GenerateRequest, config: RouterConfig, salt: bytes = b"") -> GenerationRequest:
    params = msg.params
    sampling = sampling_from_proto(params.sampling, field="params.sampling")
    if not params.sampling.HasField("seed"):
        sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
    return GenerationRequest(
        request_id=_request_id(msg.request_id),
        prompt=_prompt(msg.prompt, len(msg.images), config),
        images=_images(msg.images, config),
        raw=msg.raw,
        max_tokens=_max_tokens(params, config),
        sampling=sampling,
        stop=_stop_strings(params.stop, config),
        ignore_eos=params.ignore_eos,
        image_keep_ratio=_keep_ratio(params, config),
        fastkv=_fastkv(params),
        cache_salt=salt,
    )


def _keep_ratio(params: router_pb2.GenerationParams, config: RouterConfig) -> float:
    ratio = params.image_keep_ratio if params.HasField("image_keep_ratio") else config.image_keep_ratio
    if not (0.0 < ratio <= 1.0):  # also rejects NaN
        raise InvalidArgumentError(f"params.image_keep_ratio must be in (0, 1] (got {ratio})")
    return ratio


def _fastkv(params: router_pb2.GenerationParams) -> common_pb2.FastKVSettings | None:
    if not params.HasField("fastkv"):
        return None
    fastkv_from_proto(params, None, field="params.fastkv")  # refuse bad settings before any work
    return params.fastkv


def _request_id(request_id: str) -> str:
    if not request_id:
        return uuid.uuid4().hex
    if not _REQUEST_ID.match(request_id):
        raise InvalidArgumentError("request_id: must be 1-128 characters of [A-Za-z0-9._:-]")
    return request_id


def _prompt(prompt: str, num_images: int, config: RouterConfig) -> str:
    size = len(prompt.encode("utf-8"))
    if size > config.max_prompt_bytes:
        raise ResourceExhaustedError(f"prompt: {size} bytes exceeds max_prompt_bytes ({config.max_prompt_bytes})")
    if not prompt.strip() and num_images == 0:
        raise InvalidArgumentError("prompt: must not be empty (send text, images, or both)")
    return prompt


def _images(images, config: RouterConfig) -> tuple[bytes, ...]:
    if len(images) > config.max_images_per_request:
        raise InvalidArgumentError(
            f"images: {len(images)} images exceeds max_images_per_request ({config.max_images_per_request})"
        )
    for i, image in enumerate(images):
        if not image.data:
            raise InvalidArgumentError(f"images[{i}]: image is empty (0 bytes)")
        if len(image.data) > config.max_image_bytes:
            raise ResourceExhaustedError(
                f"images[{i}]: {len(image.data)} bytes exceeds max_image_bytes ({config.max_image_bytes})"
            )
    return tuple(image.data for image in images)


def _max_tokens(params: router_pb2.GenerationParams, config: RouterConfig) -> int:
    max_tokens = params.max_tokens if params.HasField("max_tokens") else config.default_max_tokens
    if max_tokens <= 0:
        raise InvalidArgumentError(f"params.max_tokens: must be >= 1 (got {max_tokens})")
    return max_tokens


def _stop_strings(stop, config: RouterConfig) -> tuple[str, ...]:
    if len(stop) > config.max_stop_strings:
        raise InvalidArgumentError(
            f"params.stop: {len(stop)} stop strings exceeds the limit ({config.max_stop_strings})"
        )
    for i, s in enumerate(stop):
        if not s:
            raise InvalidArgumentError(f"params.stop[{i}]: stop strings must not be empty")
        if len(s) > config.max_stop_string_chars:
            raise InvalidArgumentError(
                f"params.stop[{i}]: {len(s)} characters exceeds the limit ({config.max_stop_string_chars})"
            )
    return tuple(stop)


def check_context(prompt_tokens: int, image_tokens: int, max_tokens: int, max_context: int) -> None:
    """prompt + max_tokens must fit the model's context; image tokens count toward the prompt."""
    if prompt_tokens + max_tokens > max_context:
        raise InvalidArgumentError(
            f"prompt ({prompt_tokens} tokens, of which {image_tokens} image tokens) + params.max_tokens ({max_tokens}) "
            f"= {prompt_tokens + max_tokens} exceeds the model's context length ({max_context})"
        )
