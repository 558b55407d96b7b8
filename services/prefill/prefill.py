"""The prefill stage's model side: validate the inputs, merge image embeddings into the prompt,
run the decoder over the prompt, sample the first token, return the KV layer by layer.

Invariant: the KV returned for layer l holds exactly the keys/values of prompt positions
[0, len(token_ids)) at logical positions 0..S-1, and the first token is sampled from the
logits of position S-1 with sampling step 0.
"""

from __future__ import annotations

import dataclasses

import torch

from epdserve.engine.generation import new_kv, prefill
from epdserve.engine.sampler import SamplingParams, sample_token
from epdserve.errors import InvalidArgumentError
from epdserve.models.decoder import Decoder, merge_image_embeddings
from epdserve.models.spec import LlavaSpec
from services.wire import check_finite


@dataclasses.dataclass(frozen=True)
class PrefillResult:
    first_token_id: int
    kv_layers: list[torch.Tensor]     # per layer [2, H_kv, S, D]
    length: int
    new_blocks: list[torch.Tensor]    # prefix-cache blocks computed here, [L, 2, H_kv, T, D] each
    computed_tokens: int              # positions actually run through the decoder


class PromptPrefiller:
    def __init__(self, spec: LlavaSpec, decoder: Decoder) -> None:
        self.spec, self.decoder = spec, decoder

    def validate(self, token_ids: list[int], embeddings: list[torch.Tensor]) -> None:
        """Raise InvalidArgumentError naming the field and limit for any input that does not fit."""
        d = self.spec.decoder
        if not token_ids:
            raise InvalidArgumentError("token_ids: prompt must not be empty")
        if len(token_ids) >= d.max_context:
            raise InvalidArgumentError(
                f"token_ids: {len(token_ids)} tokens leaves no room in the context ({d.max_context})"
            )
        bad = next((t for t in token_ids if not 0 <= t < d.vocab_size), None)
        if bad is not None:
            raise InvalidArgumentError(f"token_ids: token id {bad} is outside the vocabulary [0, {d.vocab_size})")
        for i, emb in enumerate(embeddings):
            field = f"image_embeddings[{i}]"
            if emb.dim() != 2 or emb.shape[1] != d.hidden_size or not emb.is_floating_point():
                raise InvalidArgumentError(
                    f"{field}: expected a float [tokens, {d.hidden_size}] tensor, got {emb.dtype} {tuple(emb.shape)}"
                )
            check_finite(emb, field)
        placeholders = sum(1 for t in token_ids if t == self.spec.image_token_id)
        rows = sum(emb.shape[0] for emb in embeddings)
        if placeholders != rows:
            raise InvalidArgumentError(
                f"token_ids: {placeholders} image placeholder tokens but the image embeddings have {rows} rows"
            )

    @torch.inference_mode()
    def run(self, token_ids: list[int], embeddings: list[torch.Tensor], sampling: SamplingParams,
            prefix_blocks: list[torch.Tensor] = (), publish_blocks_upto: int = 0, block_tokens: int = 1
            ) -> PrefillResult:
        """Prefill positions after the cached prefix blocks; cut the blocks [len(prefix_blocks),
        publish_blocks_upto) out of the result so they can be cached."""
        ids = torch.tensor(token_ids, device=self.decoder.device)
        embeds = self.decoder.embed(ids[None])[0]
        if embeddings:
            image_rows = torch.cat([e.to(self.decoder.device) for e in embeddings])
            embeds = merge_image_embeddings(embeds, ids, self.spec.image_token_id, image_rows)
        kv = new_kv(self.decoder, len(token_ids))
        kv.load_prefix([block.to(self.decoder.device, self.decoder.dtype) for block in prefix_blocks])
        cached = kv.length
        logits = prefill(self.decoder, embeds[cached:], kv)
        first = sample_token(logits, sampling, step=0)
        layers = [kv.layer_tensor(layer) for layer in range(kv.num_layers)]
        new_blocks = [kv.block(b * block_tokens, (b + 1) * block_tokens)
                      for b in range(len(prefix_blocks), publish_blocks_upto)]
        return PrefillResult(first, layers, kv.length, new_blocks, len(token_ids) - cached)
