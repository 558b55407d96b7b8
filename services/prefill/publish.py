"""Layer-wise KV publishing (Mooncake): each layer's KV becomes a cache entry, leased to its
decode, while the prefill computes the layers after it.

Invariant: a prompt's KV is reserved whole in the cache pool before its prefill starts (a prompt
that does not fit now waits for earlier KV to be taken, in arrival order, up to its time limit,
instead of failing half way through); every reserved region ends either committed (an entry under
the prompt's KV key, leased for its decode) or given back, and is given back only once no copy
into it can still be running (`ReservedHost.close`); the refs returned are exactly the committed
layers, in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Callable

import torch

from epdserve import tracing
from epdserve.config import PrefillConfig
from epdserve.threadpool import wait_until_done
from mmcache.client import MMCache, ReservedTensor
from mmcache.keys import kv_layer_key, new_kv_prefix
from services.load import LoadTracker
from services.prefill.layer_kv import ReservedHost, StagedHost
from services.runtime import ModelExecutor, Stopwatch


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Every layer's KV of one prompt, known before it runs: layer l is [2, H_kv, lengths[l], D]
    of dtype (lengths all the prompt's length when lossless; FastKV's plan says otherwise)."""

    lengths: tuple[int, ...]
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def shapes(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [((2, self.kv_heads, n, self.head_dim), self.dtype) for n in self.lengths]


class LayerPublisher:
    """Runs one prefill on the model thread and publishes its KV layer by layer, into the regions
    reserved for it: on a GPU with the pool page-locked, copied straight from the GPU into them
    (one copy, `direct`); else each layer goes to a host tensor first (pinned on a GPU; on a CPU
    the layer loop's own) and worker threads copy it into its region, off the model thread."""

    def __init__(self, cache: MMCache, executor: ModelExecutor, config: PrefillConfig, load: LoadTracker,
                 device: torch.device) -> None:
        self.cache, self.executor, self.config, self.load = cache, executor, config, load
        self.direct = torch.device(device).type == "cuda" and cache.page_locked
        self._giving_back: set[asyncio.Task] = set()

    async def reserve(self, layout: KVLayout, timeout_s: float, *, held_bytes: int = 0,
                      what: str = "the prompt's KV") -> list[ReservedTensor]:
        """The pool regions of a prompt's KV; waits for room (RESOURCE_EXHAUSTED when there is none
        within timeout_s, or ever next to the `held_bytes` the request holds in the pool)."""
        return await self.cache.reserve_tensors(layout.shapes(), timeout_s=timeout_s, held_bytes=held_bytes,
                                                what=what, wait_flag="--kv-wait-s, or the request's deadline")

    async def run(self, run: Callable, reserved: list[ReservedTensor], watch: Stopwatch, computed_tokens: int):
        """`run(on_layer=, host=)` on the model thread, each layer published as it lands; returns
        (result, refs). On failure or cancellation no layer is left behind: published ones are
        released, reserved ones given back."""
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue = asyncio.Queue()
        published: list = []
        host = ReservedHost([r.tensor for r in reserved]) if self.direct else StagedHost()

        def on_layer(layer: int, tensor, ready) -> None:  # called on the model thread
            loop.call_soon_threadsafe(arrived.put_nowait, (layer, tensor, ready))

        publisher = asyncio.ensure_future(self._publish_layers(arrived, published, reserved))
        try:
            timed = self.load.running(computed_tokens, functools.partial(run, on_layer=on_layer, host=host))
            with tracing.span("prefill.forward", {"epdserve.computed_tokens": computed_tokens}):
                result = await self.executor.run(timed)
            started = time.perf_counter()
            await asyncio.shield(publisher)
            watch.timings_ms["kv_publish_ms"] = (time.perf_counter() - started) * 1000.0
            return result, published
        except BaseException:
            giving_back = asyncio.ensure_future(self._give_back(publisher, host, reserved, published))
            self._giving_back.add(giving_back)
            giving_back.add_done_callback(self._giving_back.discard)
            await asyncio.shield(giving_back)  # cancelled again while it runs: it still runs to the end
            raise

    async def _give_back(self, publisher: asyncio.Future, host: StagedHost | ReservedHost,
                         reserved: list[ReservedTensor], published: list) -> None:
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        await asyncio.to_thread(host.close)  # the model thread writes no more layers; copies issued have landed
        self.cache.abandon(reserved)
        await self.cache.release(published)

    async def _publish_layers(self, arrived: asyncio.Queue, published: list, reserved: list[ReservedTensor]) -> None:
        with tracing.span("prefill.kv_publish", {"epdserve.layers": len(reserved)}) as span:
            prefix = new_kv_prefix()
            for _ in reserved:
                layer, tensor, ready = await arrived.get()
                span.add_event("layer_ready", {"epdserve.layer": layer})
                await asyncio.to_thread(ready)
                put = asyncio.ensure_future(self._publish_one(kv_layer_key(prefix, layer), tensor, reserved[layer]))
                try:
                    published.extend(await asyncio.shield(put))
                except asyncio.CancelledError:  # a put under way completes, so its entry can be released
                    await wait_until_done([put])
                    if not put.cancelled() and put.exception() is None:
                        published.extend(put.result())
                    raise

    async def _publish_one(self, key: str, tensor, region: ReservedTensor) -> list:
        source = None if tensor is region.tensor else tensor  # staged: copy it into the region
        return await self.cache.commit_reserved([(key, region, source)], ttl_s=self.config.kv_ttl_s,
                                                lease_s=self.config.kv_ttl_s, ephemeral=True)
