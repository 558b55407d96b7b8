"""Generation as small functions over a Decoder and a SequenceKV (single sequence).

`prefill` fills the KV for a prompt and returns the last position's logits; `decode_one` adds
one token; `generate` is the reference loop (tests and the golden comparison use it; the
decode service runs the same `decode_one` steps). Positions are logical positions.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from epdserve.engine.kv_cache import SequenceKV
from epdserve.engine.sampler import SamplingParams, sample_token
from epdserve.models.decoder import Decoder


def new_kv(decoder: Decoder, capacity: int) -> SequenceKV:
    spec = decoder.spec
    return SequenceKV(spec.num_layers, spec.num_kv_heads, spec.head_dim, capacity, decoder.dtype, decoder.device)


@torch.inference_mode()
def prefill(decoder: Decoder, input_embeds: torch.Tensor, kv: SequenceKV, *, all_logits: bool = False) -> torch.Tensor:
    """input_embeds: [S, d] for positions [kv.length, kv.length+S). Returns logits [V] of the last
    position (or [S, V] with all_logits)."""
    start, s = kv.length, input_embeds.shape[0]
    positions = torch.arange(start, start + s, device=decoder.device)
    h = decoder(input_embeds[None].to(decoder.dtype), positions, kv, start)
    kv.length = start + s
    rows = h[0] if all_logits else h[0, -1:]
    logits = decoder.logits(rows)
    return logits if all_logits else logits[0]


@torch.inference_mode()
def decode_one(decoder: Decoder, token_id: int, kv: SequenceKV) -> torch.Tensor:
    """Append `token_id` at position kv.length; return the next-token logits [V]."""
    ids = torch.tensor([[token_id]], device=decoder.device)
    return prefill(decoder, decoder.embed(ids)[0], kv)


def generate(
    decoder: Decoder,
    input_embeds: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_token_ids: tuple[int, ...] = (),
    ignore_eos: bool = False,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` tokens; stops after a stop token unless ignore_eos."""
    kv = new_kv(decoder, input_embeds.shape[0] + max_new_tokens)
    logits = prefill(decoder, input_embeds, kv)
    for step in range(max_new_tokens):
        token = sample_token(logits, sampling, step)
        yield token
        if (token in stop_token_ids and not ignore_eos) or step + 1 == max_new_tokens:
            return
        logits = decode_one(decoder, token, kv)
