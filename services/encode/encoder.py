"""The encode stage's model side: preprocessing with the checkpoint's image processor, the vision
tower + projector, optional token sparsification, and the content key of each image."""

from __future__ import annotations

import collections
import pathlib
import threading

import torch
from PIL import Image

from epdserve.models.loader import load_vision_encoder
from epdserve.models.spec import LlavaSpec, kept_tokens
from mmcache.keys import image_bytes_fingerprint, image_key, processor_digest
from services.encode.sparsify import TokenScorer, VisionFeatures, sparsify


class PendingEmbeddings:
    """A launched batch's embeddings, in image order. `wait()` blocks (releasing the GIL) until the
    device work that fills them has finished and returns them; read them only through it."""

    def __init__(self, tensors: list[torch.Tensor], ready: torch.cuda.Event | None) -> None:
        self._tensors, self._ready = tensors, ready

    def wait(self) -> list[torch.Tensor]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._tensors


class ImageEncoder:
    def __init__(self, spec: LlavaSpec, model_dir: pathlib.Path, revision: str, scorer: TokenScorer, *,
                 scorer_digest: str = "", dtype: str, device: str, graph_batch: int = 0) -> None:
        """`graph_batch` > 0 on CUDA: replay the tower + projector as CUDA graphs for batches up to
        it (captured now); 0 = eager."""
        from transformers import AutoImageProcessor

        self.spec, self.scorer = spec, scorer
        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.model = load_vision_encoder(spec, dtype=dtype, device=device)
        self.tower = self.model
        if graph_batch > 0 and self.model.device.type == "cuda":
            from epdserve.models.vision_graphs import GraphedVisionEncoder

            self.tower = GraphedVisionEncoder(self.model, graph_batch, spec.vision.image_size)
            with torch.inference_mode():
                self.tower.capture_all()
        self.revision = revision
        self.settings_digest = processor_digest(
            {
                "processor": self.processor.to_dict(),
                "feature_layers": list(spec.vision.feature_layers),
                "select_strategy": spec.vision.select_strategy,
                "dtype": str(self.model.dtype),
                "scorer": scorer.name,
                "scorer_weights": scorer_digest,
            }
        )

    def key(self, image: Image.Image, salt: bytes = b"", keep_ratio: float = 1.0) -> str:
        """Content key of an image's embeddings: pixels, model, preprocessing, scorer, keep ratio."""
        settings = self.settings_digest if keep_ratio == 1.0 else f"{self.settings_digest}/keep={keep_ratio!r}"
        return image_key(image, model_revision=self.revision, processor_digest=settings, tenant_salt=salt)

    def encode(self, images: list[Image.Image], keep_ratios: list[float], *, to_host: bool = True
               ) -> list[torch.Tensor]:
        """RGB images -> one embedding per image [kept_tokens, hidden], once they are ready
        (`launch(...).wait()`)."""
        return self.launch(images, keep_ratios, to_host=to_host).wait()

    @torch.inference_mode()
    def launch(self, images: list[Image.Image], keep_ratios: list[float], *, to_host: bool = True
               ) -> PendingEmbeddings:
        """Queue the encoding of a batch: preprocessing, one tower run for the batch, sparsification
        per keep ratio, and (with `to_host`) the copies into pinned host memory, all in stream
        order on the model's device. Returns without waiting for the device, so the model thread
        can prepare the next batch while this one runs; `wait()` on the result (from any thread)
        blocks until the embeddings are complete. Without `to_host` they stay on the device, copied
        out of the tower's graph memory (the next launch overwrites it)."""
        embeddings, hidden_states = self.tower.encode(self._pixels(images))  # may be graph memory
        out: list[torch.Tensor | None] = [None] * len(images)
        for ratio in sorted(set(keep_ratios)):
            rows = [i for i, r in enumerate(keep_ratios) if r == ratio]
            if kept_tokens(embeddings.shape[1], ratio) == embeddings.shape[1]:  # lossless: no scoring
                for i in rows:
                    out[i] = embeddings[i]
                continue
            features = self._features(embeddings, hidden_states, rows)
            for i, tensor in zip(rows, sparsify(features, self.scorer, ratio)):
                out[i] = tensor
        if self.model.device.type != "cuda":
            return PendingEmbeddings(out, None)
        out = _copy_to_host(out) if to_host else [t.clone() for t in out]  # nothing may alias graph memory
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.model.device))
        return PendingEmbeddings(out, ready)

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """Preprocess with the checkpoint's processor; torchvision-backed processors run on the
        model's device (resize / normalise on the GPU), the PIL one on the CPU."""
        if self.model.device.type != "cpu" and not type(self.processor).__name__.endswith("Pil"):
            return self.processor(images=images, return_tensors="pt", device=self.model.device)["pixel_values"]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def _features(self, embeddings, hidden_states, rows: list[int]) -> VisionFeatures:
        index = torch.tensor(rows, device=embeddings.device)
        return VisionFeatures(
            embeddings=embeddings.index_select(0, index),
            hidden_states=tuple(h.index_select(0, index) for h in hidden_states),
            tower=self.model.vision_tower,
            feature_layer=self.spec.vision.feature_layers[-1],
            dropped_cls=self.spec.vision.select_strategy == "default" and self.spec.vision.has_cls_token,
        )


class RecentKeys:
    """Content keys of recently seen image bytes: sha256(bytes, tenant salt, keep ratio) -> key,
    so a repeated image skips decoding and pixel hashing. A bounded LRU, safe across threads."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._keys: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self._lock = threading.Lock()

    fingerprint = staticmethod(image_bytes_fingerprint)

    def get(self, fingerprint: bytes) -> str | None:
        with self._lock:
            key = self._keys.get(fingerprint)
            if key is not None:
                self._keys.move_to_end(fingerprint)
            return key

    def put(self, fingerprint: bytes, key: str) -> None:
        with self._lock:
            self._keys[fingerprint] = key
            self._keys.move_to_end(fingerprint)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)


def _copy_to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pinned host tensors that the current stream fills from `tensors` (asynchronous copies: read
    them only after the stream has passed this point)."""
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for dst, src in zip(host, tensors):
        dst.copy_(src, non_blocking=True)
    return host
