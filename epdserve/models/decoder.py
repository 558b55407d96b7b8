"""The decoder (text backbone) as layer-level pieces a stage can loop over.

A stage's own layer loop looks like `forward` below: embed (or merge image embeddings),
for each layer `attention_block` then `feed_forward_block`, then `logits` on the rows it
needs. Positions are always explicit (logical positions), never derived from a cache length.
"""

from __future__ import annotations

import torch
from torch import nn

from epdserve.models.layers import DecoderLayer, LayerKV, RMSNorm, RotaryEmbedding
from epdserve.models.spec import DecoderSpec


class Decoder(nn.Module):
    def __init__(self, spec: DecoderSpec, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.spec = spec
        self.rope = rope
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids: [B, S] -> [B, S, d]."""
        return self.embed_tokens(token_ids)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope.cos_sin(positions, self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on whatever rows the caller passes (e.g. only the last)."""
        return self.lm_head(self.norm(h))

    def forward(self, h: torch.Tensor, positions: torch.Tensor, kv: LayerKV | None, start: int) -> torch.Tensor:
        """Run every layer over h ([B, S, d] at sequence positions [start, start+S)); returns hidden states."""
        cos, sin = self.cos_sin(positions)
        for layer in self.layers:
            h = layer(h, cos, sin, kv, start)
        return h


def merge_image_embeddings(
    text_embeds: torch.Tensor, token_ids: torch.Tensor, image_token_id: int, image_embeds: torch.Tensor
) -> torch.Tensor:
    """Replace the rows of image placeholder tokens by image embedding rows, in order.

    text_embeds: [S, d]; token_ids: [S]; image_embeds: [N, d] with N == count of placeholders.
    """
    mask = token_ids == image_token_id
    count = int(mask.sum())
    if count != image_embeds.shape[0]:
        raise ValueError(f"{count} image placeholder tokens but {image_embeds.shape[0]} image embedding rows")
    merged = text_embeds.clone()
    merged[mask] = image_embeds.to(merged.dtype)
    return merged
