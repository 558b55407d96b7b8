"""Prefill's KV hand-off on CUDA (skipped without a GPU): the cache pool page-locks, each layer is
copied from the GPU straight into its reserved region, and the published entries hold exactly
the device KV; the prefill's layers through reserved regions equal those through pinned buffers."""

from __future__ import annotations

import mmap
import shutil
import tempfile

import pytest
import torch

from epdserve.config import PrefillConfig
from epdserve.engine.host_memory import page_lock, unpin
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
    """A pool on tmpfs, as deployed (CUDA refuses to page-lock a mapping of a file on disk)."""
    shm_dir = tempfile.mkdtemp(dir="/dev/shm")
    yield await open_cache(capacity_bytes=64 << 20, shm_dir=shm_dir)
    shutil.rmtree(shm_dir, ignore_errors=True)


def test_a_refused_page_lock_leaves_no_error_behind_for_the_next_kernel(tmp_path):
    """CUDA refuses a file on disk; the refusal raises here, and later work on this thread runs
    (a failed runtime call's error would otherwise fail the next kernel launched)."""
    path = tmp_path / "pool"
    path.write_bytes(bytes(1 << 20))
    with open(path, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), 1 << 20)
    tensor = torch.frombuffer(mapping, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="cannot page-lock"):
        page_lock(tensor.data_ptr(), tensor.nbytes)
    unpin([tensor.data_ptr()])            # not registered: refused too
    assert torch.ones(4, device="cuda").sum().item() == 4.0
    del tensor
    mapping.close()


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
