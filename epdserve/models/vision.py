"""Vision tower + projector: pixel values -> image embeddings in the decoder's hidden size.

The tower (CLIP or SigLIP) and the projector are `transformers` modules; this wrapper picks
the configured hidden-state layer(s) and select strategy exactly as LLaVA does.
"""

from __future__ import annotations

import torch
from torch import nn

from epdserve.models.spec import LlavaSpec


class VisionEncoder(nn.Module):
    def __init__(self, spec: LlavaSpec) -> None:
        super().__init__()
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.spec = spec.vision
        self.vision_tower = AutoModel.from_config(spec.hf_config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(spec.hf_config)

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.multi_modal_projector.linear_1.weight.device

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [N, C, H, W] -> embeddings [N, tokens_per_image, hidden]."""
        return self.encode(pixel_values)[0]

    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """(embeddings [N, T, hidden], the tower's hidden states) — the latter for token scorers."""
        out = self.vision_tower(pixel_values.to(self.device, self.dtype), output_hidden_states=True, return_dict=True)
        features = [out.hidden_states[i] for i in self.spec.feature_layers]
        if self.spec.select_strategy == "default":
            features = [f[:, 1:] for f in features]
        return self.multi_modal_projector(torch.cat(features, dim=-1)), out.hidden_states
