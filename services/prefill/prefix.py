"""Prefix caching for prefill (Mooncake-style, lossless only): the KV of each full block of a
prompt is cached under a chained key, so a repeated prefix (system prompt, same images) is loaded
instead of recomputed.

Invariant: a block is reused only under a key that commits to every token and image before and
inside it, the model revision and the KV settings; at least one prompt position is always
computed (its logits give the first token).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from epdserve.config import PrefillConfig
from mmcache.client import MMCache
from mmcache.keys import prefix_block_keys

if TYPE_CHECKING:
    from services.prefill.prefill import PrefillResult

log = logging.getLogger(__name__)
LEASE_S = 60.0
MAX_PUBLISHING = 2  # prompts whose new blocks are being cut and cached at once


@dataclasses.dataclass
class PrefixHit:
    keys: list[str]         # keys of every full block of the prompt
    refs: list              # leased refs of the cached leading blocks
    blocks: list            # their tensors [L, 2, H_kv, T, D] (valid until the refs are released)

    @property
    def blocks_cached(self) -> int:
        return len(self.blocks)


def image_spans(token_ids: Sequence[int], image_token_id: int, image_refs) -> list[tuple[int, int, str]]:
    """(start, end, image key) of each image's placeholder tokens, images taken in order."""
    spans, position = [], 0
    for ref in image_refs:
        while position < len(token_ids) and token_ids[position] != image_token_id:
            position += 1
        spans.append((position, position + int(ref.shape[0]), ref.key))
        position += int(ref.shape[0])
    return spans


class PrefixCache:
    def __init__(self, cache: MMCache, config: PrefillConfig, model_revision: str, kv_settings: str,
                 image_token_id: int) -> None:
        self.cache, self.config = cache, config
        self.revision, self.kv_settings, self.image_token_id = model_revision, kv_settings, image_token_id
        self._cutter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefix-blocks")
        self._publishing = 0

    def keys(self, token_ids: Sequence[int], image_refs, salt: bytes) -> list[str]:
        if not self.config.prefix_cache:
            return []
        return prefix_block_keys(token_ids, self.config.prefix_block_tokens, model_revision=self.revision,
                                 kv_settings=self.kv_settings, tenant_salt=salt,
                                 image_spans=image_spans(token_ids, self.image_token_id, image_refs))

    async def lookup(self, token_ids: Sequence[int], image_refs, salt: bytes) -> PrefixHit:
        keys = self.keys(token_ids, image_refs, salt)
        usable = (len(token_ids) - 1) // self.config.prefix_block_tokens  # keep >= 1 position to compute
        refs = await self.cache.longest_prefix(keys[:usable], lease_s=LEASE_S) if usable else []
        blocks = await self.cache.get_many(refs)
        run = next((i for i, b in enumerate(blocks) if b is None), len(blocks))
        await self.cache.release(refs[run:])
        return PrefixHit(keys, refs[:run], blocks[:run])

    async def publish(self, hit: PrefixHit, result: "PrefillResult", holds: Sequence[tuple[str, str]] = ()) -> None:
        """Cache the blocks this request computed (best effort: the request does not wait on it).
        The blocks are cut out of the request's KV on this cache's own thread, never on the model
        thread, and the KV is let go as soon as they are (`holds`, the (key, lease id) pairs that
        keep its cache entries alive, are released then); with MAX_PUBLISHING prompts' blocks
        already on their way, a new prompt's are skipped (a burst of long prompts must not pile
        up copies of their KV in host memory)."""
        first, end = result.new_block_range
        if end <= first or self._publishing >= MAX_PUBLISHING:
            if end > first:
                log.debug("prefix blocks not cached: %d prompts' blocks already being published", self._publishing)
            await self.cache.release_local(holds)
            return
        self._publishing += 1
        try:
            try:
                blocks = await asyncio.get_running_loop().run_in_executor(self._cutter, result.new_blocks)
            finally:
                await asyncio.shield(self.cache.release_local(holds))
            del result  # the whole prompt's KV: only the blocks are needed from here on
            await self.cache.put_many(list(zip(hit.keys[first:end], blocks)), ttl_s=self.config.prefix_ttl_s)
        except Exception as exc:  # a full cache must not fail the request that already succeeded
            log.warning("prefix blocks not cached: %s", exc)
        finally:
            self._publishing -= 1
