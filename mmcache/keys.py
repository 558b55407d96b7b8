"""Cache keys: content hashes (SHA-256 over a canonical, length-prefixed encoding; never Python
`hash()`), random KV prefixes, and the versioned Redis key schema."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from epdserve.errors import InvalidArgumentError

SCHEMA_VERSION = "v1"
_KEY = re.compile(r"^[A-Za-z0-9:_-]{1,200}$")


def _field(h: "hashlib._Hash", value: bytes) -> None:
    h.update(len(value).to_bytes(8, "little"))
    h.update(value)


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
