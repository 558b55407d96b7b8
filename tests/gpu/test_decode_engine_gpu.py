"""GPU tier of the decode engine: the continuously batched engine (eager and CUDA-graph replay)
gives the single-sequence reference decoder's greedy tokens on CUDA (fp32, and bf16 on short
fixtures, per ALGORITHMS.md §0.2), with sequences joining and leaving the batch."""

from __future__ import annotations

import pytest
import torch

from epdserve.config import DecodeConfig
from epdserve.engine.generation import new_kv, prefill
from epdserve.engine.sampler import SamplingParams
from epdserve.models.loader import load_decoder
from epdserve.models.spec import load_spec
from services.decode.decoder import TokenDecoder
from services.decode.engine import DecodeJob
from services.decode.setup import build_engine

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(temperature=0.0)


def _job(decoder, request_id, length, max_new):
    ids = torch.randint(3, decoder.spec.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    kv = new_kv(decoder, length)
    logits = prefill(decoder, decoder.embed(ids.to(decoder.device))[0], kv)
    layers = [kv.layer_tensor(layer).cpu() for layer in range(decoder.spec.num_layers)]
    return DecodeJob(request_id, layers, length, int(torch.argmax(logits)), max_new, GREEDY)


def _reference(decoder, job):
    steps = TokenDecoder(decoder)
    seq = steps.load(job.layers, job.first_token, job.max_new_tokens, GREEDY, job.length)
    return [steps.step(seq) for _ in range(job.max_new_tokens)]


@pytest.mark.parametrize("backbone", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("graphs", [False, True])
def test_batched_engine_gives_the_reference_tokens_on_cuda(tiny_checkpoint_factory, backbone, dtype, graphs):
    decoder = load_decoder(load_spec(tiny_checkpoint_factory(backbone, "clip", 11)), dtype=dtype, device="cuda")
    new = 12 if dtype == "float32" else 6
    jobs = [_job(decoder, f"r{i}", length, new + i) for i, length in enumerate((9, 70, 33, 5, 120))]
    expected = {job.request_id: _reference(decoder, job) for job in jobs}
    engine = build_engine(decoder, DecodeConfig(block_size=16, max_context=256, max_running=8, kv_cache_gib=0.05,
                                                cuda_graphs=graphs))
    streams: dict[str, list[int]] = {}
    step = 0
    while engine.has_work or step <= 3:
        arrivals = jobs[:2] if step == 0 else jobs[2:] if step == 3 else []
        for event in engine.step(arrivals).tokens:
            streams.setdefault(event.request_id, []).append(event.token)
        step += 1
    assert streams == expected
    assert engine.kv.num_free_blocks == engine.kv.capacity_blocks
