"""The Redis index: one small hash per entry (its header), with a TTL. Batch-first: every method
is one pipelined round trip; no KEYS/SCAN on any path."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence

from mmcache.codec import CorruptEntryError
from mmcache.keys import index_key

log = logging.getLogger(__name__)
_FIELDS = ("owner", "host", "address", "location", "dtype", "shape", "nbytes", "checksum", "created_at")


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    key: str
    owner: str            # owner id (process epoch): entries die with their owner
    host: str             # owner's host id: same host -> read shared memory in place
    address: str          # owner's gRPC address (CacheTransfer) for other hosts
    location: str         # path of the bytes on the owner's host
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: str
    created_at: float

    def to_fields(self) -> dict[str, str]:
        values = dataclasses.asdict(self)
        values["shape"] = json.dumps(list(self.shape))
        return {name: str(values[name]) for name in _FIELDS}

    @classmethod
    def from_fields(cls, key: str, fields: dict) -> "IndexEntry":
        try:
            get = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                   for k, v in fields.items()}
            shape = tuple(int(d) for d in json.loads(get["shape"]))
            return cls(key=key, owner=get["owner"], host=get["host"], address=get["address"],
                       location=get["location"], dtype=get["dtype"], shape=shape, nbytes=int(get["nbytes"]),
                       checksum=get["checksum"], created_at=float(get["created_at"]))
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptEntryError(f"malformed index entry for {key}: {exc}") from None


class RedisIndex:
    """Entry headers in Redis under `<namespace>:mmcache:v1:<key>`; safe to share across tasks."""

    def __init__(self, redis, namespace: str) -> None:
        self.redis = redis
        self.namespace = namespace

    def _k(self, key: str) -> str:
        return index_key(self.namespace, key)

    async def put_many(self, entries: Sequence[IndexEntry], ttl_s: float) -> None:
        if not entries:
            return
        pipe = self.redis.pipeline(transaction=False)
        for entry in entries:
            pipe.delete(self._k(entry.key))
            pipe.hset(self._k(entry.key), mapping=entry.to_fields())
            pipe.pexpire(self._k(entry.key), max(1, int(ttl_s * 1000)))
        await pipe.execute()

    async def get_many(self, keys: Sequence[str]) -> list[IndexEntry | None]:
        """Headers in key order; a missing or malformed entry is None (malformed ones are logged)."""
        if not keys:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self._k(key))
        out: list[IndexEntry | None] = []
        for key, fields in zip(keys, await pipe.execute()):
            out.append(self._parse(key, fields))
        return out

    def _parse(self, key: str, fields: dict) -> IndexEntry | None:
        if not fields:
            return None
        try:
            return IndexEntry.from_fields(key, fields)
        except CorruptEntryError as exc:
            log.warning("%s", exc)
            return None

    async def touch_many(self, keys: Sequence[str], ttl_s: float) -> None:
        if not keys:
            return
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.pexpire(self._k(key), max(1, int(ttl_s * 1000)))
        await pipe.execute()

    async def delete_many(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        return int(await self.redis.delete(*(self._k(k) for k in keys)))
