"""`epdserve sparsify train`: fit Dynamic-LLaVA's image predictor to a checkpoint by distillation.

Target: how much the LLM itself attends to each image token. For each (image, prompt) pair the
prompt is run through the decoder up to `layer` (Dynamic-LLaVA sparsifies at layer 2), and the
attention of the prompt tokens after the image to each image token (averaged over heads and those
queries) is the target distribution. The predictor's keep-scores, softmaxed over the image's
tokens, are trained to match it (KL divergence). Runs on the tiny model on CPU in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import random

import torch
import torch.nn.functional as F
from PIL import Image

from epdserve.models.decoder import Decoder, merge_image_embeddings
from epdserve.models.layers import apply_rope, causal_mask
from epdserve.models.loader import load_decoder, load_vision_encoder
from epdserve.models.spec import load_spec
from services.encode.sparsify import ImagePredictor

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    layer: int = 2              # decoder layer whose attention is the target
    width: int = 512            # predictor width (Dynamic-LLaVA: 512)
    lr: float = 1e-4            # 1e-3 diverged on the visual-QA model (top-half overlap below chance)
    seed: int = 0
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainReport:
    samples: int
    first_loss: float
    last_loss: float
    topk_overlap: float         # mean overlap of predicted and target top-half image tokens
    parameters: int


@torch.inference_mode()
def image_attention_target(decoder: Decoder, embeds: torch.Tensor, image_positions: torch.Tensor,
                           query_positions: torch.Tensor, layer: int) -> torch.Tensor:
    """Attention of `query_positions` to `image_positions` at decoder `layer`, averaged over heads
    and queries and normalised to sum to one. embeds: [S, d] (image embeddings already merged)."""
    s = embeds.shape[0]
    positions = torch.arange(s, device=decoder.device)
    cos, sin = decoder.cos_sin(positions)
    h = embeds[None].to(decoder.dtype)
    for block in decoder.layers[:layer]:
        h = block(h, cos, sin, None, 0)
    attn = decoder.layers[layer].self_attn
    x = decoder.layers[layer].input_layernorm(h)
    q = apply_rope(attn.q_proj(x).view(1, s, attn.num_heads, attn.head_dim).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(1, s, attn.num_kv_heads, attn.head_dim).transpose(1, 2), cos, sin)
    k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    scores = (q[:, :, query_positions] @ k.transpose(-1, -2)).float() / attn.head_dim ** 0.5
    mask = causal_mask(0, s, s, attn.window, decoder.device)[query_positions]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    target = probs[..., image_positions].mean(dim=(0, 1, 2))
    return target / target.sum()


def load_samples(images_dir: pathlib.Path, prompts_file: pathlib.Path) -> list[tuple[Image.Image, str]]:
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    if not images:
        raise ValueError(f"{images_dir} has no images ({', '.join(IMAGE_SUFFIXES)})")
    if not prompts:
        raise ValueError(f"{prompts_file} has no prompts (one per line)")
    return [(Image.open(path).convert("RGB"), prompts[i % len(prompts)]) for i, path in enumerate(images)]


def _prepare(model_dir: pathlib.Path, samples, layer: int):
    """Per sample: (image embeddings [T, d], target distribution [T]) from the frozen model."""
    from transformers import AutoImageProcessor

    from epdserve.models.prompt import PromptBuilder

    spec = load_spec(model_dir)
    decoder, vision = load_decoder(spec, device="cpu"), load_vision_encoder(spec, device="cpu")
    processor, prompts = AutoImageProcessor.from_pretrained(model_dir), PromptBuilder(spec)
    layer = min(layer, spec.decoder.num_layers - 1)
    prepared = []
    for image, prompt in samples:
        with torch.inference_mode():
            embedding = vision(processor(images=[image], return_tensors="pt")["pixel_values"])[0]
        ids = torch.tensor(prompts.build(prompt, 1, raw=False).token_ids)
        embeds = merge_image_embeddings(decoder.embed(ids[None])[0], ids, spec.image_token_id, embedding)
        image_pos = (ids == spec.image_token_id).nonzero().flatten()
        queries = torch.arange(int(image_pos[-1]) + 1, len(ids))
        target = image_attention_target(decoder, embeds, image_pos, queries, layer)
        prepared.append((embedding.clone(), target.clone()))
    return spec, prepared


def train_predictor(model_dir: pathlib.Path, samples, config: TrainConfig = TrainConfig()
                    ) -> tuple[ImagePredictor, TrainReport]:
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    spec, data = _prepare(model_dir, samples, config.layer)
    predictor = ImagePredictor(spec.decoder.hidden_size, config.width)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=config.lr)
    losses = []
    for _ in range(config.steps):
        embedding, target = data[rng.randrange(len(data))]
        scores = predictor.keep_score(embedding[None])[0] / config.temperature
        loss = F.kl_div(torch.log_softmax(scores, dim=-1), target, reduction="sum")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    report = TrainReport(samples=len(data), first_loss=_mean(losses[:10]), last_loss=_mean(losses[-10:]),
                         topk_overlap=_topk_overlap(predictor, data), parameters=_count(predictor))
    return predictor.eval(), report


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.inference_mode()
def _topk_overlap(predictor: ImagePredictor, data) -> float:
    overlaps = []
    for embedding, target in data:
        k = max(1, embedding.shape[0] // 2)
        predicted = set(torch.topk(predictor.keep_score(embedding[None])[0], k).indices.tolist())
        wanted = set(torch.topk(target, k).indices.tolist())
        overlaps.append(len(predicted & wanted) / k)
    return _mean(overlaps)


def save_predictor(predictor: ImagePredictor, path: pathlib.Path, report: TrainReport) -> None:
    from safetensors.torch import save_file

    metadata = {"llm_hidden": str(predictor.llm_hidden), "width": str(predictor.width),
                "report": json.dumps(dataclasses.asdict(report))}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in predictor.state_dict().items()}, str(path), metadata=metadata)
