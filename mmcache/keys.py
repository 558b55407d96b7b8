"""Cache keys: content hashes (SHA-256 over a canonical, length-prefixed encoding; never Python
`hash()`), random KV prefixes, and the versioned Redis key schema."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from epdserve.errors import InvalidArgumentError

SCHEMA_VERSION = "v1"
_KEY = re.compile(r"^[A-Za-z0-9:_-]{1,200}$")


def _field(h: "hashlib._Hash", value: bytes) -> None:
    h.update(len(value).to_bytes(8, "little"))
    h.update(value)


def image_bytes_fingerprint(data: bytes, tenant_salt: bytes, keep_ratio: float) -> bytes:
    """Digest of an encoded image's bytes under a tenant and keep ratio: equal digests mean equal
    bytes (so equal pixels and equal image keys under the same model and settings)."""
    h = hashlib.sha256()
    for part in (b"epdserve-image-bytes-v1", data, tenant_salt, repr(keep_ratio).encode()):
        _field(h, part)
    return h.digest()


def image_key(image: Any, *, model_revision: str, processor_digest: str, tenant_salt: bytes = b"") -> str:
    """Key of a decoded PIL image under one model revision and preprocessing: equal keys mean equal
    pixels, mode, size, model and settings (and tenant, when salted)."""
    h = hashlib.sha256()
    for part in (b"epdserve-image-v1", image.mode.encode(), f"{image.size[0]}x{image.size[1]}".encode(),
                 image.tobytes(), model_revision.encode(), processor_digest.encode(), tenant_salt):
        _field(h, part)
    return "img:" + h.hexdigest()


def processor_digest(settings: Mapping[str, Any]) -> str:
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def new_kv_prefix() -> str:
    """A random prefix for one request's KV entries (never derived from client input)."""
    return "kv:" + uuid.uuid4().hex


def kv_layer_key(prefix: str, layer: int) -> str:
    return f"{prefix}:{layer}"


def index_key(namespace: str, key: str) -> str:
    return f"{namespace}:mmcache:{SCHEMA_VERSION}:{key}"


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise InvalidArgumentError("key: must be 1-200 characters of [A-Za-z0-9:_-]")
    return key


def prefix_block_keys(token_ids: Sequence[int], block_tokens: int, *, model_revision: str, kv_settings: str,
                      image_spans: Sequence[tuple[int, int, str]] = (), tenant_salt: bytes = b"") -> list[str]:
    """Chained keys of the full blocks of a prompt (Mooncake): key k = H(key k-1, tokens of block k,
    the content keys of images whose tokens fall in block k and where). Equal keys mean an equal
    block and an equal prefix before it; a trailing partial block has no key.

    image_spans: (start, end, image_key) token ranges of each image's placeholder tokens.
    kv_settings: everything besides the tokens that changes the KV (dtype, ...)."""
    import struct

    parent = hashlib.sha256()
    for part in (b"epdserve-kv-block-v1", model_revision.encode(), kv_settings.encode(), tenant_salt,
                 str(block_tokens).encode()):
        _field(parent, part)
    digest = parent.digest()
    keys = []
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        end = start + block_tokens
        h = hashlib.sha256()
        _field(h, digest)
        _field(h, struct.pack(f"<{block_tokens}i", *token_ids[start:end]))
        for img_start, img_end, image in image_spans:
            if img_start < end and img_end > start:
                _field(h, f"{image}@{img_start - start}:{img_end - start}".encode())
        digest = h.digest()
        keys.append("kvb:" + digest.hex())
    return keys
