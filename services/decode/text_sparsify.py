"""Generated-token sparsification (Dynamic-LLaVA's decode mode, "online KV-cache compression").

Invariant: at the sparsification layer the scorer decides, from the new token's hidden state
alone, whether its K/V is kept; layers below it always append the new row, layers at or above it
append it only when kept. The token always attends to its own K/V in its own step, and positions
continue from the logical length whatever was dropped. With keep_rate 1.0 no scorer is built and
every row is kept: the exact path, bit for bit.

Scorers: `hidden-norm` (training-free stand-in; the paper has none for text: a threshold on the
hidden state's log-RMS, moved by a stochastic-approximation step so the kept fraction converges
to keep_rate) and `learned` (Dynamic-LLaVA's output-text predictor P^OT, LayerNorm -> Linear(d, 512)
-> GELU -> 512 -> 256 -> 128 -> 2, from a safetensors file; keep when logit 0 > logit 1).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import nn

TEXT_SCORERS = ("hidden-norm", "learned")


@dataclasses.dataclass(frozen=True)
class TextSparsifyConfig:
    keep_rate: float = 1.0        # target fraction of generated tokens whose KV is kept (1.0 = off)
    layer: int = 2                # decisions apply to this layer and all later ones
    scorer: str = "hidden-norm"
    predictor_path: str = ""      # safetensors file of a trained P^OT (scorer "learned")
    threshold_step: float = 0.05  # hidden-norm: threshold update per decision (log-RMS units)

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_rate <= 1.0:
            raise ValueError(f"text_keep_rate must be in (0, 1] (got {self.keep_rate})")
        if self.scorer not in TEXT_SCORERS:
            raise ValueError(f"text_scorer must be one of {TEXT_SCORERS} (got {self.scorer!r})")
        if self.scorer == "learned" and not self.predictor_path:
            raise ValueError("text_scorer 'learned' needs --text-predictor (a safetensors file)")

    @property
    def enabled(self) -> bool:
        return self.keep_rate < 1.0 or self.scorer == "learned"


class TextKeepScorer(Protocol):
    def keep(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """hidden [B, d] at the sparsification layer's input, valid [B] bool (False = padding) ->
        bool [B] keep decisions. Device ops only (no host sync: CUDA-graph safe); may update the
        scorer's own state from the valid rows."""
        ...


class HiddenNormKeep:
    def __init__(self, keep_rate: float, step: float, device: torch.device) -> None:
        self.keep_rate, self.step = keep_rate, step
        self.threshold = torch.zeros((), dtype=torch.float32, device=device)
        self.started = torch.zeros((), dtype=torch.bool, device=device)

    def keep(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        score = hidden.float().pow(2).mean(-1).clamp_min(1e-30).log() * 0.5  # log-RMS
        counted = valid.float()
        first_mean = (score * counted).sum() / counted.sum().clamp_min(1.0)  # starting point of the threshold
        self.threshold.copy_(torch.where(self.started, self.threshold, first_mean))
        self.started.fill_(True)
        keep = score >= self.threshold
        kept = (keep.float() * counted).sum()
        self.threshold += self.step * (kept - self.keep_rate * counted.sum())
        return keep


class OutputTextPredictor(nn.Module):
    """Dynamic-LLaVA's P^OT: a per-token MLP, logits (keep, drop)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, 512), nn.GELU(),
                                 nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 2))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)


class LearnedKeep:
    def __init__(self, predictor: OutputTextPredictor) -> None:
        self.predictor = predictor

    def keep(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        logits = self.predictor(hidden.to(next(self.predictor.parameters()).dtype))
        return logits[:, 0] > logits[:, 1]


def load_output_text_predictor(path: str, hidden_size: int, device, dtype) -> OutputTextPredictor:
    """Raises ValueError naming the file when its tensors do not fit a P^OT for this model."""
    from safetensors.torch import load_file

    predictor = OutputTextPredictor(hidden_size)
    try:
        predictor.load_state_dict(load_file(path))
    except RuntimeError as exc:
        raise ValueError(f"{path}: not an output-text predictor for hidden size {hidden_size} ({exc})") from None
    return predictor.to(device, dtype).eval()


def build_scorer(config: TextSparsifyConfig, num_layers: int, hidden_size: int, device, dtype
                 ) -> TextKeepScorer | None:
    """None when sparsification is off (the exact path)."""
    if not config.enabled:
        return None
    if not 1 <= config.layer < num_layers:
        raise ValueError(f"text_sparsify_layer must be in [1, {num_layers}) for this model (got {config.layer})")
    if config.scorer == "learned":
        return LearnedKeep(load_output_text_predictor(config.predictor_path, hidden_size, device, dtype))
    return HiddenNormKeep(config.keep_rate, config.threshold_step, device)
