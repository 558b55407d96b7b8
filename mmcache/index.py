"""The Redis index: one small JSON header string per entry, with a TTL.

Batch-first: each method is one round trip (a pipeline or one Lua call); no KEYS/SCAN on any
path a request takes. A lookup returns only entries whose owner is alive (its heartbeat key
exists), so nobody is sent to a dead or restarted owner. Key schema (versioned):
  <ns>:mmcache:v1:e:<key>        entry header (string, PX = entry TTL)
  <ns>:mmcache:v1:owners         hash: owner id -> owner info (JSON)
  <ns>:mmcache:v1:alive:<owner>  heartbeat from the owner's event loop: it answers (PX = a few intervals)
  <ns>:mmcache:v1:live:<owner>   heartbeat from a thread of the owner's: its process runs (same PX)
  <ns>:mmcache:v1:owned:<owner>  set of the entry keys an owner published
  <ns>:mmcache:v1:ready:<prefix> stream of readiness events (layer-wise publishing)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence

from mmcache.codec import CorruptEntryError, check_layout
from mmcache.guard import RedisGuard
from mmcache.keys import SCHEMA_VERSION

log = logging.getLogger(__name__)

_LOOKUP = """
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = false
  local h = redis.call('GET', k)
  if h then
    local ok, obj = pcall(cjson.decode, h)
    if ok and type(obj) == 'table' and type(obj['o']) == 'string'
        and redis.call('EXISTS', ARGV[1] .. obj['o']) == 1 then
      out[i] = h
      if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', k, ARGV[2]) end
    end
  end
end
return out
"""


def schema(namespace: str) -> str:
    return f"{namespace}:mmcache:{SCHEMA_VERSION}"


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    key: str
    owner: str             # owner id (a process start): entries die with their owner
    host: str              # owner's host id: same host -> read in place
    control_address: str   # owner's gRPC address (lease / release)
    data_address: str      # owner's data channel (byte streams to other hosts)
    tier: str              # device | host | disk
    path: str              # pool file or entry file on the owner's host ("" for device)
    offset: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: str
    created_at: float

    _FIELDS = {"o": "owner", "h": "host", "c": "control_address", "x": "data_address", "t": "tier", "p": "path",
               "f": "offset", "d": "dtype", "s": "shape", "n": "nbytes", "k": "checksum", "a": "created_at"}

    def to_json(self) -> str:
        values = {short: getattr(self, name) for short, name in self._FIELDS.items()}
        return json.dumps({"v": 1, **values}, separators=(",", ":"))

    @classmethod
    def from_json(cls, key: str, text: bytes | str) -> "IndexEntry":
        try:
            raw = json.loads(text)
            values = {name: raw[short] for short, name in cls._FIELDS.items()}
            values["shape"] = tuple(int(d) for d in values["shape"])
            values["offset"], values["nbytes"] = int(values["offset"]), int(values["nbytes"])
            check_layout(values["dtype"], values["shape"], values["nbytes"])
            return cls(key=key, **values)
        except CorruptEntryError as exc:
            raise CorruptEntryError(f"malformed index entry for {key}: {exc}") from None
        except (KeyError, ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise CorruptEntryError(f"malformed index entry for {key}: {type(exc).__name__}") from None


class RedisIndex:
    """Entry headers and the owner registry. Every call goes through the guard (bounded, fails fast
    with CacheUnavailableError while Redis is away)."""

    def __init__(self, redis, namespace: str, guard: RedisGuard) -> None:
        self.redis, self.guard = redis, guard
        self.prefix = schema(namespace)
        self._lookup = redis.register_script(_LOOKUP)

    def entry_key(self, key: str) -> str:
        return f"{self.prefix}:e:{key}"

    def alive_key(self, owner: str) -> str:
        return f"{self.prefix}:alive:{owner}"

    def live_key(self, owner: str) -> str:
        return f"{self.prefix}:live:{owner}"

    def owned_key(self, owner: str) -> str:
        return f"{self.prefix}:owned:{owner}"

    @property
    def owners_key(self) -> str:
        return f"{self.prefix}:owners"

    async def put_many(self, entries: Sequence[IndexEntry], ttl_s: float, *, drop: Sequence[str] = ()) -> None:
        """Delete `drop`, then write the headers (and record them in their owner's set): one pipeline."""
        if not entries and not drop:
            return

        async def run():
            pipe = self.redis.pipeline(transaction=False)
            if drop:
                pipe.delete(*(self.entry_key(k) for k in drop))
            for entry in entries:
                pipe.set(self.entry_key(entry.key), entry.to_json(), px=_ms(ttl_s))
                pipe.sadd(self.owned_key(entry.owner), entry.key)
            await pipe.execute()

        await self.guard.run(run)

    async def update_many(self, entries: Sequence[IndexEntry]) -> None:
        """Rewrite headers of entries that moved tier, keeping their TTL (only if still indexed)."""
        if not entries:
            return

        async def run():
            pipe = self.redis.pipeline(transaction=False)
            for entry in entries:
                pipe.set(self.entry_key(entry.key), entry.to_json(), keepttl=True, xx=True)
            await pipe.execute()

        await self.guard.run(run)

    async def get_many(self, keys: Sequence[str], *, ttl_s: float | None = None) -> list[IndexEntry | None]:
        """Headers in key order; None for a missing key, a malformed header, or a dead owner.
        With ttl_s, each hit's TTL is refreshed in the same round trip."""
        if not keys:
            return []
        raw = await self.guard.run(lambda: self._lookup(
            keys=[self.entry_key(k) for k in keys], args=[f"{self.prefix}:alive:", _ms(ttl_s) if ttl_s else 0]))
        return [self._parse(key, text) for key, text in zip(keys, raw)]

    def _parse(self, key: str, text) -> IndexEntry | None:
        if text is None:
            return None
        try:
            return IndexEntry.from_json(key, text)
        except CorruptEntryError as exc:
            log.warning("%s", exc)
            return None

    async def delete_many(self, keys: Sequence[str], *, owner: str = "") -> int:
        if not keys:
            return 0

        async def run():
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(*(self.entry_key(k) for k in keys))
            if owner:
                pipe.srem(self.owned_key(owner), *keys)
            return (await pipe.execute())[0]

        return int(await self.guard.run(run))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
