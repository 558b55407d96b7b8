"""Vision-token sparsification on the encode side (Dynamic-LLaVA's image part, VisionZip /
FasterVLM-style training-free scorers): keep the highest-scoring image tokens at a keep ratio, in
their original order, so fewer bytes move and prefill sees fewer tokens.

Invariants: an image keeps exactly `kept_tokens(T, r)` tokens; kept indices are strictly
increasing; at r = 1 nothing is scored or moved (the lossless path, bit for bit). The prompt side
uses the same `kept_tokens`, so the router's placeholder count always matches.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import nn

from epdserve.models.spec import kept_tokens


@dataclasses.dataclass(frozen=True)
class VisionFeatures:
    """What a scorer may look at for a batch of images."""

    embeddings: torch.Tensor          # [N, T, d_llm] projected tokens (what the LLM will see)
    hidden_states: tuple              # the vision tower's hidden states (embeddings output, then per layer)
    tower: nn.Module                  # the vision tower (for attention recomputation)
    feature_layer: int                # index into hidden_states of the (last) selected layer
    dropped_cls: bool                 # the selected tokens exclude a leading CLS token


class TokenScorer(Protocol):
    """Scores image tokens; higher means keep. Reads `features`, mutates nothing; returns [N, T]."""

    name: str

    def score(self, features: VisionFeatures) -> torch.Tensor: ...


class FeatureNormScorer:
    """Baseline: the L2 norm of each projected token."""

    name = "feature-norm"

    def score(self, features: VisionFeatures) -> torch.Tensor:
        return features.embeddings.float().norm(dim=-1)


class ClsAttentionScorer:
    """Training-free default (FasterVLM / VisionZip style): the attention the vision tower's layer
    after the selected features pays to each token, from the CLS query when the tower has one,
    else averaged over all queries. Only the rows needed are recomputed by hand (no eager mode)."""

    name = "cls-attention"

    def score(self, features: VisionFeatures) -> torch.Tensor:
        layer, layer_input = _next_layer(features.tower, features.hidden_states, features.feature_layer)
        h = layer.layer_norm1(layer_input)
        attn = layer.self_attn
        n, t, _ = h.shape
        q = attn.q_proj(h).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        if features.dropped_cls:  # CLS row only: [N, H, 1, T]
            probs = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)
            return probs.mean(dim=(1, 2))[:, 1:]
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)
        return probs.mean(dim=(1, 2))  # attention each token receives, averaged over heads and queries


def _next_layer(tower: nn.Module, hidden_states: tuple, feature_layer: int):
    """The encoder layer that reads the selected features, and its input. hidden_states[i] is the
    input of layers[i]; features from the very last hidden state use the last layer's own attention."""
    layers = getattr(tower, "vision_model", tower).encoder.layers
    index = min(feature_layer % len(hidden_states), len(layers) - 1)
    return layers[index], hidden_states[index]


class ImagePredictor(nn.Module):
    """Dynamic-LLaVA's image predictor: LN -> Linear(d->w) -> GELU -> 2 transformer blocks (w, 8 heads,
    MLP x4) -> [local half | global (mean) half] -> MLP w->w/2->w/4->2. Logits are (keep, drop)."""

    def __init__(self, llm_hidden: int, width: int = 512, heads: int = 8) -> None:
        super().__init__()
        self.llm_hidden, self.width = llm_hidden, width
        self.stem = nn.Sequential(nn.LayerNorm(llm_hidden), nn.Linear(llm_hidden, width), nn.GELU())
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True)
        self.blocks = nn.TransformerEncoder(block, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, width // 4),
                                  nn.GELU(), nn.Linear(width // 4, 2))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings [N, T, d_llm] -> logits [N, T, 2]."""
        x = self.blocks(self.stem(embeddings))
        local, global_ = x.split(self.width // 2, dim=-1)
        global_ = global_.mean(dim=1, keepdim=True).expand_as(global_)
        return self.head(torch.cat([local, global_], dim=-1))

    def keep_score(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self(embeddings).float(), dim=-1)[..., 0]


class LearnedScorer:
    """A trained ImagePredictor (`epdserve sparsify train`), loaded from safetensors."""

    name = "learned"

    def __init__(self, predictor: ImagePredictor) -> None:
        self.predictor = predictor.eval()

    @classmethod
    def load(cls, path: str, *, device: torch.device | str = "cpu") -> "LearnedScorer":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        predictor = ImagePredictor(int(meta["llm_hidden"]), int(meta["width"]))
        predictor.load_state_dict(load_file(path), strict=True)
        return cls(predictor.to(device))

    def score(self, features: VisionFeatures) -> torch.Tensor:
        weights = next(self.predictor.parameters())
        return self.predictor.keep_score(features.embeddings.to(weights.device, weights.dtype))


def build_scorer(name: str, predictor_path: str = "") -> TokenScorer:
    if name == "cls-attention":
        return ClsAttentionScorer()
    if name == "feature-norm":
        return FeatureNormScorer()
    if name == "learned":
        if not predictor_path:
            raise ValueError("scorer 'learned' needs a predictor file (--predictor-path)")
        return LearnedScorer.load(predictor_path)
    raise ValueError(f"scorer {name!r} is not one of cls-attention, feature-norm, learned")


def sparsify(features: VisionFeatures, scorer: TokenScorer, keep_ratio: float) -> torch.Tensor:
    """[N, T, d] -> [N, kept_tokens(T, r), d]: the highest-scoring tokens in original order."""
    n, t, d = features.embeddings.shape
    keep = kept_tokens(t, keep_ratio)
    if keep == t:
        return features.embeddings
    scores = scorer.score(features)
    index = torch.topk(scores, keep, dim=-1).indices.sort(dim=-1).values
    return torch.gather(features.embeddings, 1, index.to(features.embeddings.device)[..., None].expand(n, keep, d))
