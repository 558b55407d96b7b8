"""Decoder building blocks: RMSNorm, RoPE, GQA attention, SwiGLU MLP, Mixtral MoE.

Parameter names mirror the Hugging Face checkpoints (`self_attn.q_proj`, `mlp.gate_proj`,
`block_sparse_moe.experts.3.w1`, ...) so weights load by name. Shapes use B (batch),
S (new positions), H (heads), D (head dim).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from epdserve.models.spec import DecoderSpec


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding:
    """cos/sin tables for explicit (logical) positions; frequencies fixed at load time."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        self.inv_freq = inv_freq.to(torch.float32)
        self.attention_scaling = attention_scaling

    @classmethod
    def from_hf_config(cls, text_config, head_dim: int, rope_type: str) -> "RotaryEmbedding":
        if rope_type == "default":
            base = _rope_theta(text_config)
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            return cls(inv_freq, 1.0)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](text_config)
        return cls(inv_freq, float(scaling))

    def to(self, device: torch.device | str) -> "RotaryEmbedding":
        return RotaryEmbedding(self.inv_freq.to(device), self.attention_scaling)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [S] int64 -> (cos, sin), each [S, D] in `dtype`."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def _rope_theta(text_config) -> float:
    params = getattr(text_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(text_config, "rope_theta", 10000.0))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, D]; cos/sin: [S, D]."""
    return x * cos + _rotate_half(x) * sin


class LayerKV(Protocol):
    """Where one layer's keys and values live while a sequence is processed."""

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([B, H_kv, S, D]) at positions [start, start+S) of `layer` and return views of
        all keys/values [0, start+S) for that layer. The views stay valid until the next write."""
        ...


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.window = spec.sliding_windows[layer]
        d = spec.hidden_size
        self.q_proj = nn.Linear(d, spec.num_heads * spec.head_dim, bias=spec.attention_bias)
        self.k_proj = nn.Linear(d, spec.num_kv_heads * spec.head_dim, bias=spec.attention_bias)
        self.v_proj = nn.Linear(d, spec.num_kv_heads * spec.head_dim, bias=spec.attention_bias)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, d, bias=spec.output_bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV | None, start: int
    ) -> torch.Tensor:
        """x: [B, S, d] holding positions [start, start+S) of the sequence; returns [B, S, d]."""
        q, k, v = self.project(x, cos, sin)
        if kv is not None:
            k, v = kv.write(self.layer, k, v, start)
        elif start != 0:
            raise ValueError("start > 0 needs a KV store holding the earlier positions")
        return self.output(self.attend(q, k, v, start))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, d] -> q [B, H, S, D], k and v [B, H_kv, S, D], RoPE applied (per-token work)."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """[B, H, S, D] attention output -> o_proj [B, S, d] (per-token work)."""
        b, _, s, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """q [B, H, S, D] at positions [start, start+S) against all keys so far -> [B, H, S, D]."""
        s, total = q.shape[2], k.shape[2]
        gqa = self.num_heads != self.num_kv_heads
        if s == 1 and (self.window is None or total <= self.window):
            return deterministic_sdpa(q, k, v, enable_gqa=gqa)
        if start == 0 and (self.window is None or total <= self.window):
            return deterministic_sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = causal_mask(start, s, total, self.window, q.device)
        return deterministic_sdpa(q, k, v, attn_mask=mask, enable_gqa=gqa)


# cuDNN attention, PyTorch's first choice on Hopper for one-query GQA decode, gives different bits
# run to run on the same inputs (H200, torch 2.11: 54 of 200 repeats differed; see docs/BENCHMARKS.md);
# flash, memory-efficient and math attention do not. Greedy decoding must be reproducible.
DETERMINISTIC_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def deterministic_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention without the cuDNN backend on CUDA (same arguments, same result)."""
    scope = sdpa_kernel(list(DETERMINISTIC_SDPA_BACKENDS)) if q.is_cuda else contextlib.nullcontext()
    with scope:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def causal_mask(start: int, s: int, total: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [s, total] mask: query start+i sees key j iff j <= start+i and start+i-j < window."""
    q_pos = torch.arange(start, start + s, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    return allowed


def _activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One Mixtral expert: w2(act(w1(x)) * w3(x))."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class MixtralMoE(nn.Module):
    """Top-k routed experts. Expert outputs are summed in canonical (ascending) expert order."""

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        assert spec.moe is not None
        self.top_k = spec.moe.top_k
        self.gate = nn.Linear(spec.hidden_size, spec.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(
            Expert(spec.hidden_size, spec.intermediate_size, spec.hidden_act) for _ in range(spec.moe.num_experts)
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, d] -> (weights [N, k] float32, expert ids [N, k])."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, experts = self.route(flat)
        out = torch.zeros_like(flat)
        for expert_id in torch.unique(experts).tolist():
            tokens, slot = torch.where(experts == expert_id)
            y = self.experts[expert_id](flat[tokens]) * weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if spec.moe is not None:
            self.block_sparse_moe = MixtralMoE(spec)
        else:
            self.mlp = MLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act, spec.mlp_bias)

    @property
    def feed_forward(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def attention_block(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV | None, start: int
    ) -> torch.Tensor:
        return h + self.self_attn(self.input_layernorm(h), cos, sin, kv, start)

    def feed_forward_block(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.feed_forward(self.post_attention_layernorm(h))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV | None, start: int):
        return self.feed_forward_block(self.attention_block(h, cos, sin, kv, start))
