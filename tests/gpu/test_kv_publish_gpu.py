"""Prefill's KV hand-off on CUDA (skipped without a GPU): the cache pool page-locks, each layer is
copied from the GPU straight into its reserved region, and the published entries hold exactly
the device KV; the prefill's layers through reserved regions equal those through pinned buffers."""

from __future__ import annotations

import pytest
import torch

from epdserve.config import PrefillConfig
from epdserve.engine.sampler import SamplingParams
from epdserve.models.loader import load_decoder
from epdserve.models.spec import load_spec
from services.load import LoadTracker
from services.prefill.layer_kv import ReservedHost
from services.prefill.prefill import PromptPrefiller
from services.prefill.publish import KVLayout, LayerPublisher
from services.runtime import ModelExecutor, Stopwatch

pytestmark = pytest.mark.gpu


@pytest.fixture
async def cache(open_cache):
    return await open_cache(capacity_bytes=64 << 20)


async def test_layers_go_from_the_gpu_straight_into_the_page_locked_pool(cache):
    assert cache.page_lock_pool() and cache.page_locked
    layers = [torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.float16) for _ in range(6)]
    layout = KVLayout((300,) * 6, 4, 64, torch.float16)
    executor = ModelExecutor("model", calls_serve_one_request=True)
    publisher = LayerPublisher(cache, executor, PrefillConfig(), LoadTracker("prefill", ""), torch.device("cuda"))
    assert publisher.direct
    reserved = await publisher.reserve(layout, timeout_s=1)
    assert all(r.tensor.is_pinned() for r in reserved)      # registered: the copy is a DMA, asynchronous
    stream = torch.cuda.Stream()

    def hand_off(*, on_layer, host):
        assert isinstance(host, ReservedHost)
        for i, layer in enumerate(layers):
            tensor, ready = host.take(i, layer * 1, stream)  # a temporary, as the layer loop's stack is
            on_layer(i, tensor, ready)

    try:
        _, refs = await publisher.run(hand_off, reserved, Stopwatch(), 300)
        got = await cache.get_many(refs)
        assert all(torch.equal(g, layer.cpu()) for g, layer in zip(got, layers))
        await cache.release(refs)
        assert cache.store.tiers["host"].pool.used_bytes == 0
    finally:
        executor.shutdown()


def test_reserved_regions_give_the_same_kv_as_pinned_buffers(tiny_checkpoint):
    spec = load_spec(tiny_checkpoint)
    decoder = load_decoder(spec, dtype="float16", device="cuda")
    prefiller = PromptPrefiller(spec, decoder)
    ids = torch.randint(0, spec.decoder.vocab_size, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = SamplingParams(temperature=0.0)
    staged = prefiller.run(ids, [], greedy)
    regions = [torch.empty(2, spec.decoder.num_kv_heads, 200, spec.decoder.head_dim, dtype=torch.float16,
                           pin_memory=True) for _ in range(spec.decoder.num_layers)]
    direct = prefiller.run(ids, [], greedy, host=ReservedHost(regions))
    assert direct.first_token_id == staged.first_token_id
    assert all(a.data_ptr() == r.data_ptr() for a, r in zip(direct.kv_layers, regions))
    assert all(torch.equal(a, b) for a, b in zip(direct.kv_layers, staged.kv_layers))
