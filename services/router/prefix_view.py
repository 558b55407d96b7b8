"""The router's read-only view of the prefix cache (Mooncake's Conductor): how many leading blocks
of a prompt are cached, and where they live, so that each prefill replica's predicted TTFT counts
only the uncached tokens plus the transfer of blocks it does not hold.

Invariant: the keys are the prefill replicas' own (`mmcache.keys.prefix_block_keys` with the
settings each replica reports), so a block counted here is one that replica would load; the view
never leases, refreshes or writes anything, and an index outage reads as "nothing cached".
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from epdserve.v1 import load_pb2
from mmcache.index import IndexEntry

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CachedPrefix:
    tokens: int                       # leading prompt tokens whose KV blocks are cached
    blocks: tuple[IndexEntry, ...] = ()

    def transfer_bytes(self, replica: load_pb2.LoadReport | None) -> int:
        """Bytes of the cached blocks `replica` would have to move: those owned by another process
        on another host, or held in another process's device memory."""
        if replica is None:
            return sum(b.nbytes for b in self.blocks)
        return sum(b.nbytes for b in self.blocks
                   if b.host != replica.host_id or (b.tier == "device" and b.owner != replica.replica_id))


NOTHING_CACHED = CachedPrefix(0)


def prefix_settings(report: load_pb2.LoadReport | None) -> tuple[int, str, str] | None:
    """(block tokens, kv settings, revision) a prefill replica keys its blocks with; None when its
    prefix cache is off or it has not reported yet."""
    if report is None or report.prefix_block_tokens <= 0:
        return None
    return report.prefix_block_tokens, report.prefix_kv_settings, report.model_revision


class PrefixView:
    """Looks prompts up in the mmcache index (one Redis round trip per distinct replica setting)."""

    def __init__(self, redis_url: str, namespace: str, timeout_s: float = 0.25) -> None:
        import redis.asyncio as aioredis

        from mmcache.guard import RedisGuard
        from mmcache.index import RedisIndex

        self.redis = aioredis.from_url(redis_url, socket_timeout=timeout_s)
        self.index = RedisIndex(self.redis, namespace, RedisGuard(self.redis, timeout_s=timeout_s))

    async def cached(self, settings: tuple[int, str, str], token_ids: Sequence[int], image_token_id: int,
                     image_refs, salt: bytes) -> CachedPrefix:
        from mmcache.keys import prefix_block_keys
        from services.prefill.prefix import image_spans

        block_tokens, kv_settings, revision = settings
        usable = (len(token_ids) - 1) // block_tokens  # the prefill always computes >= 1 position
        if usable <= 0:
            return NOTHING_CACHED
        keys = prefix_block_keys(token_ids, block_tokens, model_revision=revision, kv_settings=kv_settings,
                                 tenant_salt=salt, image_spans=image_spans(token_ids, image_token_id, image_refs))
        try:
            entries = await self.index.get_many(keys[:usable])
        except Exception as exc:  # the view is advisory: an outage means "nothing cached"
            log.debug("prefix lookup skipped: %s", exc)
            return NOTHING_CACHED
        run = next((i for i, e in enumerate(entries) if e is None), len(entries))
        return CachedPrefix(run * block_tokens, tuple(entries[:run]))

    async def close(self) -> None:
        await self.redis.aclose()
