"""Expert predictors for proactive MoE prefetching (ProMoE, ALGORITHMS.md §6b).

A predictor looks at layer ℓ's MoE input (the post-attention-norm hidden state) and scores the
experts of a later layer `target` (ℓ + distance). Scores are aggregated over tokens as the union of
per-token top-k, each expert ranked by its summed score (0 = not predicted); the offloader caps the
list at the cache's per-layer capacity. Predictors only steer prefetching: outputs never depend on
them.

- `SkipGatePredictor` (training-free default): layer `target`'s own gate applied to layer ℓ's input.
- `LearnedPredictor`: ProMoE's 2-layer MLP per layer, trained offline by `train_predictors`, saved
  and loaded with safetensors.
- `OraclePredictor` (from an `ExpertTrace` of a reference run), `RandomPredictor`,
  `EmptyPredictor`: for tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from epdserve.models.layers import MixtralMoE

FORMAT = "epdserve-moe-predictor-v1"


class ExpertPredictor(Protocol):
    """Scores the experts of a later layer from an earlier layer's MoE input.

    `distance`: the layer distance it was built for (None: any). `wraps`: whether it also predicts
    layers of the next forward pass (target < layer) when layer + distance runs past the last layer.
    """

    distance: int | None
    wraps: bool

    def priority(self, layer: int, target: int, step: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden: [N, d] MoE input of `layer` in forward pass `step` (read, never mutated).
        Returns float32 [E] scores for `target`'s experts on hidden's device (0 = not predicted,
        higher = more likely; the caller owns it), or None for no prediction. Never raises for a
        layer it has no model for: returns None."""
        ...


def union_topk(probs: torch.Tensor, k: int) -> torch.Tensor:
    """[N, E] per-token scores -> [E]: summed scores of each token's top-k experts (0 elsewhere)."""
    top, idx = torch.topk(probs.float(), k, dim=-1)
    out = torch.zeros(probs.shape[-1], dtype=torch.float32, device=probs.device)
    return out.scatter_add_(0, idx.reshape(-1), top.reshape(-1))


def moe_modules(decoder: nn.Module) -> list[nn.Module]:
    """Each layer's MoE module (MixtralMoE or OffloadedMoE: both expose `gate`, `top_k`, `route`)."""
    modules = [layer.feed_forward for layer in decoder.layers]
    if not all(hasattr(m, "gate") and hasattr(m, "top_k") for m in modules):
        raise ValueError("every decoder layer must be a Mixtral-style MoE layer (gate + routed experts)")
    return modules


def route(module: nn.Module, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's own routing (MixtralMoE.route) for [N, d] inputs -> (weights [N, k], ids [N, k])."""
    return MixtralMoE.route(module, flat)


class SkipGatePredictor:
    """Applies layer `target`'s gate to layer ℓ's MoE input. Holds references to the gates (the
    model owns them); no state of its own."""

    distance = None
    wraps = False

    def __init__(self, gates: Sequence[nn.Module], top_k: int) -> None:
        self.gates, self.top_k = list(gates), top_k

    def priority(self, layer: int, target: int, step: int, hidden: torch.Tensor) -> torch.Tensor | None:
        probs = F.softmax(self.gates[target](hidden).float(), dim=-1)
        return union_topk(probs, self.top_k)


class EmptyPredictor:
    """Never predicts (the offloader then only fetches at gate time)."""

    distance = None
    wraps = False

    def priority(self, layer: int, target: int, step: int, hidden: torch.Tensor) -> torch.Tensor | None:
        return None


class RandomPredictor:
    """Predicts `top_k` uniformly random experts per call (seeded), wrapping into the next pass."""

    distance = None
    wraps = True

    def __init__(self, num_experts: int, top_k: int, seed: int = 0) -> None:
        self.num_experts, self.top_k = num_experts, top_k
        self._gen = torch.Generator().manual_seed(seed)

    def priority(self, layer: int, target: int, step: int, hidden: torch.Tensor) -> torch.Tensor | None:
        scores = torch.rand(self.num_experts, generator=self._gen)
        keep = torch.topk(scores, self.top_k).indices
        return torch.zeros_like(scores).index_fill_(0, keep, 1.0).mul_(scores).to(hidden.device)


@dataclasses.dataclass
class ExpertTrace:
    """Routing of a reference run: passes[step][layer] = union_topk of the true routing weights."""

    passes: list[list[torch.Tensor]] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def record_expert_trace(decoder: nn.Module) -> Iterator[ExpertTrace]:
    """Record every forward pass's routing while the block runs (hooks removed on exit). A pass
    starts when layer 0's MoE runs."""
    trace = ExpertTrace()

    def hook(layer: int):
        def record(module: nn.Module, args: tuple) -> None:
            flat = args[0].reshape(-1, args[0].shape[-1])
            weights, experts = route(module, flat)
            scores = torch.zeros(module.gate.out_features, dtype=torch.float32, device=flat.device)
            if layer == 0:
                trace.passes.append([])
            trace.passes[-1].append(scores.scatter_add_(0, experts.reshape(-1), weights.reshape(-1)).cpu())
        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(moe_modules(decoder))]
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()


class OraclePredictor:
    """Replays a recorded trace: predicts exactly the experts the reference run used."""

    distance = None
    wraps = True

    def __init__(self, trace: ExpertTrace) -> None:
        self.trace = trace

    def priority(self, layer: int, target: int, step: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if step >= len(self.trace.passes):
            return None
        return self.trace.passes[step][target].to(hidden.device)


# ---- learned predictor ----------------------------------------------------------------------------

class _PredictorMLP(nn.Module):
    def __init__(self, hidden: int, width: int, experts: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, width)
        self.fc2 = nn.Linear(width, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LearnedPredictor(nn.Module):
    """One 2-layer MLP per source layer ℓ in [0, L - distance): layer ℓ's MoE input -> logits of
    layer ℓ + distance's experts. Runs in float32 on its own device (`.to(device)`)."""

    wraps = False

    def __init__(self, num_layers: int, hidden_size: int, num_experts: int, top_k: int, distance: int,
                 width: int = 512) -> None:
        super().__init__()
        if not 1 <= distance < num_layers:
            raise ValueError(f"distance must be in [1, {num_layers - 1}] (got {distance})")
        self.num_layers, self.hidden_size, self.num_experts = num_layers, hidden_size, num_experts
        self.top_k, self.distance, self.width = top_k, distance, width
        self.mlps = nn.ModuleList(_PredictorMLP(hidden_size, width, num_experts)
                                  for _ in range(num_layers - distance))

    def priority(self, layer: int, target: int, step: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if layer >= len(self.mlps) or target != layer + self.distance:
            return None
        mlp = self.mlps[layer]
        logits = mlp(hidden.to(mlp.fc1.weight.device, torch.float32))
        return union_topk(torch.sigmoid(logits), self.top_k).to(hidden.device)

    def save(self, path: str | pathlib.Path) -> None:
        """Write the weights and shape metadata as one safetensors file (never pickle)."""
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "num_experts": self.num_experts, "top_k": self.top_k, "distance": self.distance, "width": self.width}
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})

    @classmethod
    def load(cls, path: str | pathlib.Path, *, device: torch.device | str = "cpu") -> "LearnedPredictor":
        """Read a file written by `save`; raises ValueError when it is not one."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an epdserve MoE predictor file (format {meta.get('format')!r})")
        fields = ("num_layers", "hidden_size", "num_experts", "top_k", "distance", "width")
        predictor = cls(**{k: int(meta[k]) for k in fields})
        predictor.load_state_dict(load_file(str(path)), strict=True)
        return predictor.to(device).eval()


@dataclasses.dataclass(frozen=True)
class PredictorTrainReport:
    samples: int                            # tokens logged per layer
    eval_accuracy: tuple[float, ...]        # per source layer: |predicted top-k ∩ true top-k| / k
    skip_gate_accuracy: tuple[float, ...]   # the training-free baseline on the same eval split


def collect_routing(decoder: nn.Module, batches: Iterable[torch.Tensor]
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the decoder (no KV, no grad) over `batches` (token ids [S] or input embeddings [S, d]) and
    log each layer's MoE input and its gate's top-k. Returns (inputs[l] [T, d] float32 on the CPU,
    top-k ids[l] [T, k]). The decoder is not modified (hooks are removed)."""
    modules = moe_modules(decoder)
    inputs: list[list[torch.Tensor]] = [[] for _ in modules]
    chosen: list[list[torch.Tensor]] = [[] for _ in modules]

    def hook(layer: int):
        def record(module: nn.Module, args: tuple) -> None:
            flat = args[0].reshape(-1, args[0].shape[-1])
            inputs[layer].append(flat.float().cpu())
            chosen[layer].append(route(module, flat)[1].cpu())
        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for batch in batches:
                _run_decoder(decoder, batch)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(x) for x in inputs], [torch.cat(c) for c in chosen]


def _run_decoder(decoder: nn.Module, batch: torch.Tensor) -> None:
    embeds = decoder.embed(batch.to(decoder.device)[None])[0] if not batch.is_floating_point() else batch
    positions = torch.arange(embeds.shape[0], device=decoder.device)
    decoder(embeds[None].to(decoder.device, decoder.dtype), positions, None, 0)


def train_predictors(decoder: nn.Module, hidden_batches: Iterable[torch.Tensor], *, distance: int = 2,
                     width: int = 512, epochs: int = 30, lr: float = 1e-3, batch_size: int = 256,
                     eval_fraction: float = 0.1, seed: int = 0) -> tuple[LearnedPredictor, PredictorTrainReport]:
    """ProMoE's offline training: log every layer's MoE input and gate top-k over `hidden_batches`,
    split the tokens train/eval (1 - eval_fraction : eval_fraction, seeded), train one MLP per layer
    with BCE against the multi-hot top-k of layer ℓ + distance. Deterministic for a seed (CPU).
    Returns the predictor (on the CPU, eval mode) and its eval report."""
    inputs, chosen = collect_routing(decoder, hidden_batches)
    modules = moe_modules(decoder)
    num_experts, top_k = modules[0].gate.out_features, modules[0].top_k
    gen = torch.Generator().manual_seed(seed)
    predictor = LearnedPredictor(len(modules), inputs[0].shape[1], num_experts, top_k, distance, width)
    _init(predictor, gen)
    order = torch.randperm(inputs[0].shape[0], generator=gen)
    n_eval = max(1, int(len(order) * eval_fraction))
    train_idx, eval_idx = order[n_eval:], order[:n_eval]
    learned, skip = [], []
    for layer, mlp in enumerate(predictor.mlps):
        target = chosen[layer + distance]
        _fit(mlp, inputs[layer][train_idx], _multi_hot(target[train_idx], num_experts), epochs, lr, batch_size, gen)
        with torch.no_grad():
            learned.append(_topk_accuracy(mlp(inputs[layer][eval_idx]), target[eval_idx]))
            gate = modules[layer + distance].gate
            logits = F.linear(inputs[layer][eval_idx], gate.weight.detach().float().cpu())
            skip.append(_topk_accuracy(logits, target[eval_idx]))
    report = PredictorTrainReport(len(order), tuple(learned), tuple(skip))
    return predictor.eval(), report


def _init(predictor: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for _, p in sorted(predictor.named_parameters(), key=lambda item: item[0]):
            bound = 1.0 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.0
            p.uniform_(-bound, bound, generator=gen) if bound else p.zero_()


def _multi_hot(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(ids.shape[0], num_experts).scatter_(1, ids, 1.0)


def _fit(mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int,
         gen: torch.Generator) -> None:
    optimizer = torch.optim.Adam(mlp.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=gen).split(batch_size):
            loss = F.binary_cross_entropy_with_logits(mlp(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _topk_accuracy(scores: torch.Tensor, target: torch.Tensor) -> float:
    k = target.shape[1]
    predicted = torch.topk(scores, k, dim=-1).indices
    hits = (predicted[:, :, None] == target[:, None, :]).any(-1).sum()
    return float(hits) / target.numel()
