"""The encode stage's model side: preprocessing with the checkpoint's image processor, the vision
tower + projector, and the content key of each image."""

from __future__ import annotations

import pathlib

import torch
from PIL import Image

from epdserve.models.loader import load_vision_encoder
from epdserve.models.spec import LlavaSpec
from mmcache.keys import image_key, processor_digest


class ImageEncoder:
    def __init__(self, spec: LlavaSpec, model_dir: pathlib.Path, revision: str, *, dtype: str, device: str) -> None:
        from transformers import AutoImageProcessor

        self.spec = spec
        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.model = load_vision_encoder(spec, dtype=dtype, device=device)
        self.revision = revision
        self.settings_digest = processor_digest(
            {
                "processor": self.processor.to_dict(),
                "feature_layers": list(spec.vision.feature_layers),
                "select_strategy": spec.vision.select_strategy,
                "dtype": str(self.model.dtype),
            }
        )

    def key(self, image: Image.Image, salt: bytes = b"") -> str:
        return image_key(image, model_revision=self.revision, processor_digest=self.settings_digest,
                         tenant_salt=salt)

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images -> embeddings [N, tokens_per_image, hidden] (on the model's device)."""
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return self.model(pixel_values)
