"""The prefill stage's model side: validate the inputs, merge image embeddings into the prompt,
run the decoder over the prompt, sample the first token, return the KV layer by layer.

Invariant: lossless, the KV returned for layer l holds exactly the keys/values of prompt positions
[0, S) (S = len(token_ids)); with FastKV it holds, per KV head, the entries its selection kept
(RoPE applied at their original positions) and decode continues at logical position S. The first
token is sampled from the logits of position S-1 with sampling step 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import torch

from epdserve.engine.sampler import SamplingParams, sample_token
from epdserve.errors import InvalidArgumentError
from epdserve.models.decoder import Decoder, merge_image_embeddings
from epdserve.models.spec import LlavaSpec
from services.prefill.fastkv import FastKVConfig, FastKVPlan, kv_keep_index, selection_scores, tsp_index
from services.prefill.layer_kv import CollectedLayers, HostKV, OffloadingKV, OnLayer
from services.prefill.minisequence import MiniSequenceConfig, chunk_bounds, map_chunks, residual_chunks
from services.wire import check_finite


@dataclasses.dataclass(frozen=True)
class PrefillResult:
    first_token_id: int
    kv_layers: list[torch.Tensor]     # per layer [2, H_kv, n_l, D] (n_l < length when FastKV compressed it)
    length: int                       # logical length: decode continues at this position
    computed_tokens: int              # positions actually run through the decoder
    new_block_range: tuple[int, int] = (0, 0)  # prefix-cache blocks [first, end) computed here,
    block_tokens: int = 1                      # of this many tokens each

    def new_blocks(self) -> list[torch.Tensor]:
        """The prefix-cache blocks computed here, [L, 2, H_kv, T, D] each: copies cut out of the
        host KV (a gigabyte at 7B and 4k tokens: call it off the model thread)."""
        first, end, size = *self.new_block_range, self.block_tokens
        return [torch.stack([layer[:, :, b * size:(b + 1) * size] for layer in self.kv_layers])
                for b in range(first, end)]


class PromptPrefiller:
    def __init__(self, spec: LlavaSpec, decoder: Decoder, mini: MiniSequenceConfig = MiniSequenceConfig()) -> None:
        self.spec, self.decoder, self.mini = spec, decoder, mini

    async def validate_off_loop(self, token_ids: list[int], embeddings: list[torch.Tensor]) -> None:
        """`validate`, in a worker thread when there are embeddings: scanning them for NaN holds the
        caller's event loop otherwise (3.3 s in 40 image-heavy 7B prompts on an H100 host)."""
        if embeddings:
            await asyncio.to_thread(self.validate, token_ids, embeddings)
        else:
            self.validate(token_ids, embeddings)

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
            prefix_blocks: Sequence[torch.Tensor] = (), publish_blocks_upto: int = 0, block_tokens: int = 1, *,
            fastkv: FastKVConfig | None = None, on_layer: OnLayer | None = None,
            host: HostKV | None = None) -> PrefillResult:
        """Prefill positions after the cached prefix blocks; the result can cut the blocks
        [len(prefix_blocks), publish_blocks_upto) out of its KV so they can be cached. Each finished layer's KV is
        handed to `on_layer` as soon as it is on the host (layer-wise publishing), in memory `host` gives
        (default `StagedHost`: fresh pinned buffers on a GPU, the layer's own tensor on a CPU)."""
        if fastkv is not None and (prefix_blocks or publish_blocks_upto):
            raise ValueError("FastKV KV depends on the whole prompt: it cannot use or feed the prefix cache")
        embeds = self.embed(token_ids, embeddings)
        collected = CollectedLayers()

        def hand_off(layer: int, tensor: torch.Tensor, ready) -> None:
            collected(layer, tensor, ready)
            if on_layer is not None:
                on_layer(layer, tensor, ready)

        kv = OffloadingKV(self.decoder.device, hand_off, prefix_blocks=prefix_blocks, host=host)
        cached = kv.prefix_length
        plan = fastkv.plan(self.spec.decoder.num_layers, len(token_ids)) if fastkv is not None else None
        logits = forward_prompt(self.decoder, embeds[cached:], kv, self.mini, plan)
        first = sample_token(logits[-1], sampling, step=0)
        blocks = (len(prefix_blocks), max(len(prefix_blocks), publish_blocks_upto))
        return PrefillResult(first, collected.layers(), len(token_ids), len(token_ids) - cached, blocks, block_tokens)

    def embed(self, token_ids: list[int], embeddings: list[torch.Tensor]) -> torch.Tensor:
        """Prompt embeddings [S, d]: token embeddings with the image rows merged in, in order."""
        ids = torch.tensor(token_ids, device=self.decoder.device)
        embeds = self.decoder.embed(ids[None])[0]
        if embeddings:
            image_rows = torch.cat([e.to(self.decoder.device) for e in embeddings])
            embeds = merge_image_embeddings(embeds, ids, self.spec.image_token_id, image_rows)
        return embeds


@torch.inference_mode()
def forward_prompt(decoder: Decoder, embeds: torch.Tensor, kv: OffloadingKV, mini: MiniSequenceConfig,
                   plan: FastKVPlan | None = None, *, all_logits: bool = False) -> torch.Tensor:
    """The prefill layer loop. embeds [S, d] at positions [P, P+S) after a cached prefix of P;
    returns logits [1, V] of the last position, or [S, V] with all_logits (MLP, norms and LM
    head over mini-sequences; with last_position_only the last layer's MLP, the final norm and the
    LM head see only the last row). With a FastKV plan each layer's stored KV is compressed and
    the TSP layer hands only the selected tokens (at their original positions) to later layers."""
    start = kv.prefix_length
    positions = torch.arange(start, start + embeds.shape[0], device=decoder.device)
    cos, sin = decoder.cos_sin(positions)
    chunk = mini.chunk_length()
    last_only = mini.last_position_only and not all_logits
    h = embeds[None].to(decoder.dtype, copy=True)  # updated in place below; the caller keeps embeds
    for i, layer in enumerate(decoder.layers):
        q, k, v = _project_chunks(layer, h, cos, sin, chunk)
        keys, values = kv.write(i, k, v, start)
        del k, v
        attended = layer.self_attn.attend(q, keys, values, start)
        keep, selected = _fastkv_select(plan, i, q, kv) if plan else (None, None)
        del q, keys, values
        h = residual_chunks(_attention_update(layer, attended), h, chunk)
        del attended
        kv.finish(i, keep)
        if last_only and i == len(decoder.layers) - 1:
            h = h[:, -1:].clone()
        h = residual_chunks(_feed_forward_update(layer, h), h, chunk)
        if selected is not None:
            h, positions = h[:, selected], positions[selected]
            cos, sin = decoder.cos_sin(positions)
    return map_chunks(decoder.logits, h[0] if all_logits else h[0, -1:], chunk)


def _project_chunks(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunk: int):
    """Input norm, q/k/v projections and RoPE over mini-sequences, into whole-sequence q, k, v."""
    if h.shape[1] <= chunk:
        return layer.self_attn.project(layer.input_layernorm(h), cos, sin)
    out = None
    for start, end in chunk_bounds(h.shape[1], chunk):
        parts = layer.self_attn.project(layer.input_layernorm(h[:, start:end]), cos[start:end], sin[start:end])
        if out is None:
            out = [p.new_empty((*p.shape[:2], h.shape[1], p.shape[3])) for p in parts]
        for whole, part in zip(out, parts):
            whole[:, :, start:end] = part
    return out


def _attention_update(layer, attended: torch.Tensor):
    """Rows [a, b) of o_proj(attention output) ([B, H, S, D] -> [B, b - a, d])."""
    return lambda a, b: layer.self_attn.output(attended[:, :, a:b])


def _feed_forward_update(layer, h: torch.Tensor):
    """Rows [a, b) of MLP(norm(h))."""
    return lambda a, b: layer.feed_forward(layer.post_attention_layernorm(h[:, a:b]))


def _fastkv_select(plan: FastKVPlan, layer_index: int, q: torch.Tensor, kv: OffloadingKV):
    """(KV keep index or None, TSP token index or None) for one layer; q [1, H, n, D] (RoPE applied)."""
    keys = kv.current_keys()
    n = keys.shape[1]
    compress, propagate = plan.compresses(n), plan.propagates_subset(layer_index, n)
    if not (compress or propagate):
        return None, None
    window = plan.config.window
    scores, kept_by = selection_scores(q[0, :, -window:], keys, plan.config, picks=plan.kv_budget - window)
    keep = kv_keep_index(kept_by, n, plan.kv_budget, window) if compress else None
    selected = tsp_index(scores, n, plan.tsp_length, window) if propagate else None
    return keep, selected
