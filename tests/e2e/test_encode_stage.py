"""The encode stage through real processes: two encode replicas (images of one request spread over
them), batching across requests, in-flight dedup, and sparsification with a learned scorer."""

from __future__ import annotations

import concurrent.futures
import io

import numpy as np
import pytest
import torch
from PIL import Image

from epdserve.errors import InvalidArgumentError
from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.sdk import Client

pytestmark = pytest.mark.e2e


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (30, 44, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint, tmp_path_factory):
    from services.encode.predictor_train import TrainConfig, save_predictor, train_predictor

    samples = [(Image.open(io.BytesIO(_png(100 + i))).convert("RGB"), "What is it?") for i in range(4)]
    model, report = train_predictor(tiny_checkpoint, samples, TrainConfig(steps=30, width=32))
    path = tmp_path_factory.mktemp("predictor") / "predictor.safetensors"
    save_predictor(model, path, report)
    return path


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, predictor):
    encode = ("--max-batch-wait-ms", "60", "--scorer", "learned", "--predictor-path", str(predictor))
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu", replicas={"encode": 2},
                           stage_args={"encode": encode})
    with LocalCluster(config) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout_s=120) as client:
        yield client


def _reference(model_dir, predictor_path, prompt: str, images: list[bytes], keep: float, new_tokens: int):
    """The same request in one process: encoder + learned scorer, prompt with the kept token count,
    the decoder's greedy loop."""
    from epdserve.engine.generation import generate
    from epdserve.engine.sampler import SamplingParams
    from epdserve.models.decoder import merge_image_embeddings
    from epdserve.models.loader import load_decoder
    from epdserve.models.prompt import PromptBuilder
    from epdserve.models.spec import kept_tokens, load_spec
    from services.encode.encoder import ImageEncoder
    from services.encode.sparsify import LearnedScorer

    spec = load_spec(model_dir)
    encoder = ImageEncoder(spec, model_dir, "rev", LearnedScorer.load(str(predictor_path)), dtype="float32",
                           device="cpu")
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    rows = torch.cat(encoder.encode(pil, [keep] * len(pil)))
    ids = torch.tensor(PromptBuilder(spec).build(prompt, len(images), False,
                                                 kept_tokens(spec.tokens_per_image, keep)).token_ids)
    decoder = load_decoder(spec, device="cpu")
    embeds = merge_image_embeddings(decoder.embed(ids[None])[0], ids, spec.image_token_id, rows)
    return list(generate(decoder, embeds, new_tokens, SamplingParams(temperature=0.0), ignore_eos=True))


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.25])
def test_images_spread_over_replicas_and_sparsified_match_one_process(client, tiny_checkpoint, predictor, keep):
    images = [_png(i) for i in range(4)]
    result = client.generate("Compare them.", images=images, max_tokens=8, temperature=0.0, ignore_eos=True,
                             image_keep_ratio=keep)
    assert result.timings_ms["encode_replicas"] == 2
    assert result.usage.image_tokens == 4 * max(1, int(16 * keep))
    assert list(result.token_ids) == _reference(tiny_checkpoint, predictor, "Compare them.", images, keep, 8)


def test_both_replicas_hold_embeddings(client, cluster):
    import grpc

    from epdserve.v1 import cache_pb2, cache_pb2_grpc

    client.generate("two", images=[_png(20), _png(21)], max_tokens=1)
    for name in ("encode", "encode-1"):
        with grpc.insecure_channel(cluster.children[name].address) as channel:
            stats = cache_pb2_grpc.CacheControlStub(channel).Stats(cache_pb2.StatsRequest(), timeout=5)
        assert stats.entries_by_kind.get("img", 0) >= 1, name


def test_keep_ratio_is_part_of_the_cache_key(client):
    image = _png(30)
    first = client.generate("k", images=[image], max_tokens=1, image_keep_ratio=0.5)
    other = client.generate("k", images=[image], max_tokens=1, image_keep_ratio=1.0)
    again = client.generate("k", images=[image], max_tokens=1, image_keep_ratio=0.5)
    assert first.timings_ms["encode_cache_hits"] == 0 and other.timings_ms["encode_cache_hits"] == 0
    assert again.timings_ms["encode_cache_hits"] == 1


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5, float("nan")])
def test_invalid_keep_ratio(client, keep):
    with pytest.raises(InvalidArgumentError, match=r"params.image_keep_ratio must be in \(0, 1\]"):
        client.generate("x", images=[_png(1)], max_tokens=1, image_keep_ratio=keep)


def _concurrently(client, images: list[bytes]):
    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        futures = [pool.submit(client.generate, "same time", images=[image], max_tokens=1) for image in images]
        return [f.result() for f in futures]


def test_requests_arriving_together_share_tower_batches(client):
    results = _concurrently(client, [_png(40 + i) for i in range(6)])
    assert max(r.timings_ms.get("encode.batch_size", 0) for r in results) >= 2


def test_the_same_image_in_flight_is_encoded_once_per_replica(client):
    results = _concurrently(client, [_png(50)] * 6)
    encoded = sum(r.timings_ms.get("encode.images_encoded", 0) for r in results)
    shared = sum(r.timings_ms.get("encode.images_deduplicated", 0) for r in results)
    cached = sum(r.timings_ms["encode_cache_hits"] for r in results)
    assert encoded + shared + cached == 6
    assert 1 <= encoded <= 2  # at most once on each of the two replicas
