"""Encode-side vision-token sparsification: counts, order, exactness at keep 1.0, the scorers,
the learned predictor (architecture, cost, save/load, training by distillation), and batching."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image

from epdserve.models.loader import load_vision_encoder
from epdserve.models.spec import kept_tokens, load_spec
from services.encode.encoder import ImageEncoder
from services.encode.sparsify import (
    ClsAttentionScorer,
    FeatureNormScorer,
    ImagePredictor,
    LearnedScorer,
    VisionFeatures,
    build_scorer,
    sparsify,
)

pytestmark = pytest.mark.unit


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(n)]


def _features(model_dir, images) -> VisionFeatures:
    from transformers import AutoImageProcessor

    spec = load_spec(model_dir)
    vision = load_vision_encoder(spec, device="cpu")
    pixels = AutoImageProcessor.from_pretrained(model_dir)(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        embeddings, hidden = vision.encode(pixels)
    return VisionFeatures(embeddings, hidden, vision.vision_tower, spec.vision.feature_layers[-1],
                          spec.vision.select_strategy == "default" and spec.vision.has_cls_token)


def test_kept_tokens():
    assert [kept_tokens(576, r) for r in (1.0, 0.5, 0.25, 0.2)] == [576, 288, 144, 115]  # Dynamic-LLaVA: 115
    assert kept_tokens(16, 0.01) == 1
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep_ratio"):
            kept_tokens(16, bad)


SCORERS = [ClsAttentionScorer(), FeatureNormScorer(), LearnedScorer(ImagePredictor(64, width=32))]


@pytest.mark.parametrize("vision", ["clip", "siglip"])
@pytest.mark.parametrize("scorer", SCORERS, ids=lambda s: s.name)
def test_kept_tokens_are_the_best_scored_in_original_order(tiny_checkpoint_factory, vision, scorer):
    features = _features(tiny_checkpoint_factory("llama", vision, 0), _images(3))
    with torch.inference_mode():
        kept = sparsify(features, scorer, 0.5)
        scores = scorer.score(features)
    n, t, d = features.embeddings.shape
    assert kept.shape == (n, kept_tokens(t, 0.5), d)
    for image in range(n):
        index = torch.topk(scores[image], kept.shape[1]).indices.sort().values
        assert torch.all(index[1:] > index[:-1])
        assert torch.equal(kept[image], features.embeddings[image, index])


@pytest.mark.parametrize("scorer", SCORERS, ids=lambda s: s.name)
def test_keep_one_is_the_lossless_path_exactly(tiny_checkpoint, scorer):
    features = _features(tiny_checkpoint, _images(2))
    assert sparsify(features, scorer, 1.0) is features.embeddings


def test_cls_attention_equals_the_towers_own_attention(tiny_checkpoint):
    """The hand-recomputed CLS row equals the tower's eager attention probabilities."""
    from transformers import AutoImageProcessor, CLIPVisionModel

    features = _features(tiny_checkpoint, _images(2))
    spec = load_spec(tiny_checkpoint)
    tower = CLIPVisionModel(spec.hf_config.vision_config)
    tower.load_state_dict(features.tower.state_dict())
    tower.config._attn_implementation = "eager"
    pixels = AutoImageProcessor.from_pretrained(tiny_checkpoint)(images=_images(2), return_tensors="pt")
    with torch.inference_mode():
        out = tower(pixels["pixel_values"], output_attentions=True, output_hidden_states=True)
        ours = ClsAttentionScorer().score(features)
    layer = features.feature_layer % len(out.hidden_states)  # the layer reading the selected features
    reference = out.attentions[layer][:, :, 0, 1:].mean(dim=1)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_predictor_costs_under_one_percent_of_a_7b_llm():
    predictor = ImagePredictor(4096)  # LLaVA-1.5-7B width, the paper's 512-wide predictor
    params = sum(p.numel() for p in predictor.parameters())
    assert params < 0.01 * 6.7e9
    logits = predictor(torch.randn(2, 576, 4096))
    assert logits.shape == (2, 576, 2)


def test_learned_scorer_round_trips_through_safetensors(tmp_path):
    from services.encode.predictor_train import TrainReport, save_predictor

    predictor = ImagePredictor(64, width=32).eval()
    path = tmp_path / "p.safetensors"
    save_predictor(predictor, path, TrainReport(1, 0.0, 0.0, 0.0, 0))
    loaded = build_scorer("learned", str(path))
    x = torch.randn(2, 16, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predictor.keep_score(x), predictor.keep_score(x))
    with pytest.raises(ValueError, match="needs a predictor file"):
        build_scorer("learned")
    with pytest.raises(ValueError, match="not one of"):
        build_scorer("random")


def test_training_distils_the_llm_attention(tiny_checkpoint, tmp_path):
    """`epdserve sparsify train` on the tiny model, on CPU: the loss falls and the predictor's top half
    of image tokens overlaps the LLM's most-attended half better than chance."""
    from services.encode.predictor_train import TrainConfig, load_samples, train_predictor

    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(_images(8, seed=3)):
        image.save(images / f"{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is in the picture?\nDescribe the colours.\nIs there a red square?\n")
    predictor, report = train_predictor(tiny_checkpoint, load_samples(images, prompts),
                                        TrainConfig(steps=150, width=64, lr=3e-3))
    assert report.samples == 8
    assert report.last_loss < 0.7 * report.first_loss
    assert report.topk_overlap > 0.6  # chance is 0.5


def test_image_key_separates_keep_ratios_and_scorers(tiny_checkpoint):
    spec = load_spec(tiny_checkpoint)
    image = _images(1)[0]
    a = ImageEncoder(spec, tiny_checkpoint, "rev", ClsAttentionScorer(), dtype="float32", device="cpu")
    b = ImageEncoder(spec, tiny_checkpoint, "rev", FeatureNormScorer(), dtype="float32", device="cpu")
    assert a.key(image) != a.key(image, keep_ratio=0.5) != a.key(image, keep_ratio=0.25)
    assert a.key(image, keep_ratio=0.5) != b.key(image, keep_ratio=0.5)


def test_batcher_batches_across_callers_and_runs_one_tower_call_per_key(tiny_checkpoint):
    from services.encode.batcher import EncodeBatcher
    from services.runtime import ModelExecutor

    spec = load_spec(tiny_checkpoint)
    encoder = ImageEncoder(spec, tiny_checkpoint, "rev", ClsAttentionScorer(), dtype="float32", device="cpu")
    calls = []
    real = encoder.launch

    def spy(images, ratios, **kwargs):
        calls.append(len(images))
        return real(images, ratios, **kwargs)

    encoder.launch = spy
    images = _images(5, seed=9)

    async def run():
        batcher = EncodeBatcher(encoder, ModelExecutor("test"), max_batch=4, max_wait_ms=50)
        jobs = [batcher.encode(f"k{i}", image, 1.0) for i, image in enumerate(images)]
        jobs += [batcher.encode("k0", images[0], 1.0)]  # the same key while k0 is in flight
        results = await asyncio.gather(*jobs)
        await batcher.close()
        return results, batcher.stats

    results, stats = asyncio.run(run())
    assert calls == [4, 1]                      # max_batch respected, one call per batch
    assert stats.deduplicated == 1 and results[-1].shared is True
    assert torch.equal(results[-1][0], results[0][0])
    with torch.inference_mode():
        alone = encoder.encode([images[3]], [1.0])[0]
    torch.testing.assert_close(results[3][0], alone, rtol=1e-5, atol=1e-5)  # batching does not change results
