"""Single-sequence decoding from published layers: the reference the batched engine is tested against.

Invariant: after `load`, the sequence's KV holds the prompt's positions [0, length); step i
(i >= 1) appends the token sampled at step i-1 at logical position length + i - 1 and samples
with sampling step i, so the token stream equals a single-process generate() with the same seed.
"""

from __future__ import annotations

import dataclasses

import torch

from epdserve.engine.generation import decode_one
from epdserve.engine.kv_cache import SequenceKV
from epdserve.engine.sampler import SamplingParams, sample_token
from epdserve.errors import InvalidArgumentError
from epdserve.models.decoder import Decoder
from epdserve.models.spec import DecoderSpec


@dataclasses.dataclass
class Sequence:
    kv: SequenceKV
    sampling: SamplingParams
    last_token: int
    step: int = 1


def check_layers(spec: DecoderSpec, layers: list[torch.Tensor], length: int) -> None:
    """Each layer [2, H_kv, n, D] with 1 <= n <= length (n < length: a compressed prefill)."""
    if len(layers) != spec.num_layers:
        raise InvalidArgumentError(f"kv.layers: {len(layers)} layers, the model has {spec.num_layers}")
    for i, layer in enumerate(layers):
        shape = tuple(layer.shape)
        fits = len(shape) == 4 and shape[:2] == (2, spec.num_kv_heads) and shape[3] == spec.head_dim
        if not (fits and 1 <= shape[2] <= length and layer.is_floating_point()):
            expected = f"(2, {spec.num_kv_heads}, n, {spec.head_dim}) with 1 <= n <= kv.length ({length})"
            raise InvalidArgumentError(f"kv.layers[{i}]: expected a float tensor of shape {expected}, "
                                       f"got {layer.dtype} {shape}")
    if any(layer.shape[2] < length for layer in layers) and any(w is not None for w in spec.sliding_windows):
        raise InvalidArgumentError("kv.layers: a compressed KV cannot be used with sliding-window attention")


class TokenDecoder:
    """Single-sequence reference decoder (contiguous KV); the service runs the batched engine."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder

    def load(
        self, layers: list[torch.Tensor], first_token: int, max_new_tokens: int, sampling: SamplingParams,
        length: int | None = None,
    ) -> Sequence:
        """`length` is the logical prompt length (the KV may hold fewer rows, see check_layers)."""
        capacity = max(layer.shape[2] for layer in layers) + max_new_tokens
        kv = SequenceKV.from_layers([layer.to(self.decoder.dtype) for layer in layers], capacity,
                                    self.decoder.device, length=length)
        return Sequence(kv=kv, sampling=sampling, last_token=first_token)

    @torch.inference_mode()
    def step(self, seq: Sequence) -> int:
        logits = decode_one(self.decoder, seq.last_token, seq.kv)
        token = sample_token(logits, seq.sampling, seq.step)
        seq.last_token, seq.step = token, seq.step + 1
        return token
