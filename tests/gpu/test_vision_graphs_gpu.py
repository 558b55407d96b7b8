"""The vision tower + projector replayed as CUDA graphs gives the eager outputs: bit for bit when
the batch fills its bucket (the same kernels on the same shapes), within fp16 rounding when it is
padded; the encode stage's embeddings are the same with graphs on and off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from epdserve.models.loader import load_vision_encoder
from epdserve.models.spec import load_spec
from epdserve.models.vision_graphs import GraphedVisionEncoder
from services.encode.encoder import ImageEncoder
from services.encode.sparsify import ClsAttentionScorer

pytestmark = pytest.mark.gpu


@torch.inference_mode()
def test_graph_replay_equals_eager(tiny_checkpoint):
    spec = load_spec(tiny_checkpoint)
    encoder = load_vision_encoder(spec, dtype="float16", device="cuda")
    graphed = GraphedVisionEncoder(encoder, 8, spec.vision.image_size)
    size = spec.vision.image_size
    for batch in (1, 2, 3, 4, 7, 8):
        pixels = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.float16,
                             generator=torch.Generator("cuda").manual_seed(batch))
        eager_emb, eager_hidden = encoder.encode(pixels)
        emb, hidden = graphed.encode(pixels)
        if batch in graphed.buckets:
            assert torch.equal(emb, eager_emb) and all(torch.equal(a, b) for a, b in zip(hidden, eager_hidden))
        else:
            torch.testing.assert_close(emb, eager_emb, rtol=2e-3, atol=2e-3)
    big = torch.randn(9, 3, size, size, device="cuda", dtype=torch.float16)  # past the largest bucket: eager
    torch.testing.assert_close(graphed.encode(big)[0], encoder.encode(big)[0], rtol=0, atol=0)


def test_encode_stage_embeddings_same_with_and_without_graphs(tiny_checkpoint):
    spec = load_spec(tiny_checkpoint)
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(4)]
    kwargs = dict(dtype="float16", device="cuda")
    eager = ImageEncoder(spec, tiny_checkpoint, "rev", ClsAttentionScorer(), **kwargs)
    graphed = ImageEncoder(spec, tiny_checkpoint, "rev", ClsAttentionScorer(), graph_batch=4, **kwargs)
    for keeps in ([1.0] * 4, [0.5, 1.0, 0.25, 0.5]):
        a = eager.encode(images, keeps)
        b = graphed.encode(images, keeps)
        first = [t.clone() for t in b]
        graphed.encode(images[::-1], keeps[::-1])  # the next replay must not change what was returned
        for x, y, z in zip(a, b, first):
            assert x.shape == y.shape and torch.equal(y, z)
            torch.testing.assert_close(x, y, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("to_host", [True, False])
def test_launches_in_flight_together_each_get_their_own_embeddings(tiny_checkpoint, to_host):
    """Two batches launched back to back (the second replay overwrites the graph's outputs before
    anyone waits on the first) give what each batch gives alone."""
    spec = load_spec(tiny_checkpoint)
    rng = np.random.RandomState(1)
    images = [Image.fromarray(rng.randint(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(6)]
    encoder = ImageEncoder(spec, tiny_checkpoint, "rev", ClsAttentionScorer(), graph_batch=4,
                           dtype="float16", device="cuda")
    first_keeps, second_keeps = [1.0, 0.5, 1.0], [0.25, 1.0, 1.0]
    alone = [encoder.encode(images[:3], first_keeps, to_host=to_host),
             encoder.encode(images[3:], second_keeps, to_host=to_host)]
    first = encoder.launch(images[:3], first_keeps, to_host=to_host)
    second = encoder.launch(images[3:], second_keeps, to_host=to_host)
    for pending, expected in zip((second, first), alone[::-1]):
        got = pending.wait()
        assert [t.device.type for t in got] == ["cpu" if to_host else "cuda"] * 3
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
