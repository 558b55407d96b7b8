"""Layer-wise KV publishing into reserved pool regions (real MMCache, real model thread): layers
are published in order with the bytes written; a prefill cancelled or failing half way leaves
nothing behind (no region, entry or lease) and stops writing into its regions at the next layer."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from epdserve.config import PrefillConfig
from mmcache.client import MMCache
from services.load import LoadTracker
from services.prefill.layer_kv import LayerWritesClosed
from services.prefill.publish import KVLayout, LayerPublisher
from services.runtime import ModelExecutor, Stopwatch

pytestmark = pytest.mark.integration
LAYOUT = KVLayout(lengths=(64, 64, 64, 16), kv_heads=2, head_dim=8, dtype=torch.float32)   # FastKV-like last layer
LAYERS = len(LAYOUT.lengths)


@pytest.fixture
async def cache(open_cache):
    return await open_cache(capacity_bytes=1 << 20)


@pytest.fixture
def executor():
    executor = ModelExecutor("model", calls_serve_one_request=True)
    yield executor
    executor.shutdown()


def _layer(i: int) -> torch.Tensor:
    return torch.full((2, LAYOUT.kv_heads, LAYOUT.lengths[i], LAYOUT.head_dim), float(i))


class SlowPrefill:
    """A prefill's shape on the model thread: one layer every `step_s`, each handed to the host
    and then to on_layer; `fail_at` raises there. Records how far it got."""

    def __init__(self, step_s: float = 0.0, fail_at: int = -1) -> None:
        self.step_s, self.fail_at = step_s, fail_at
        self.layers_written, self.stopped_by = 0, None

    def __call__(self, *, on_layer, host):
        try:
            for i in range(LAYERS):
                time.sleep(self.step_s)
                if i == self.fail_at:
                    raise RuntimeError("kernel fault")
                tensor, ready = host.take(i, _layer(i), None)
                self.layers_written += 1
                on_layer(i, tensor, ready)
        except LayerWritesClosed as exc:
            self.stopped_by = exc
            raise
        return "result"


def _nothing_left(cache: MMCache) -> bool:
    return cache.store.tiers["host"].pool.used_bytes == 0 and not cache.store.keys()


def _publisher(cache, executor, direct: bool) -> LayerPublisher:
    """On a CPU the publisher stages; `direct` makes it write into the regions as it does from a GPU."""
    publisher = LayerPublisher(cache, executor, PrefillConfig(), LoadTracker("prefill", ""), torch.device("cpu"))
    assert not publisher.direct
    publisher.direct = direct
    return publisher


@pytest.mark.parametrize("direct", [False, True])
async def test_layers_are_published_in_order_into_their_regions(cache, executor, direct):
    publisher = _publisher(cache, executor, direct)
    reserved = await publisher.reserve(LAYOUT, timeout_s=1)
    watch = Stopwatch()
    result, refs = await publisher.run(SlowPrefill(), reserved, watch, 64)
    assert result == "result" and "kv_publish_ms" in watch.timings_ms
    got = await cache.get_many(refs)
    assert all(torch.equal(g, _layer(i)) for i, g in enumerate(got))
    await cache.release(refs)
    assert _nothing_left(cache)


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("how", ["cancelled", "cancelled twice", "failed"])
async def test_a_prefill_stopped_half_way_leaves_nothing_behind(cache, executor, how, direct):
    publisher = _publisher(cache, executor, direct)
    reserved = await publisher.reserve(LAYOUT, timeout_s=1)
    prefill = SlowPrefill(step_s=0.1, fail_at=2 if how == "failed" else -1)
    task = asyncio.ensure_future(publisher.run(prefill, reserved, Stopwatch(), 64))
    await asyncio.sleep(0.25)                      # layers 0 and 1 written (and published)
    if how.startswith("cancelled"):
        task.cancel()
    if how == "cancelled twice":                   # again while it gives back (waiting for the model thread)
        await asyncio.sleep(0.01)
        task.cancel()
    with pytest.raises(asyncio.CancelledError if how.startswith("cancelled") else RuntimeError):
        await task
    await asyncio.sleep(0.3)                       # a give-back cancelled mid-way finishes in the background
    assert _nothing_left(cache)                    # published layers released, the rest given back
    if how.startswith("cancelled"):                # the model thread stopped at its next layer
        assert isinstance(prefill.stopped_by, LayerWritesClosed) and prefill.layers_written < LAYERS
