"""The shared training loop: batches built by worker processes (--data-workers) are the batches the
one-thread prefetch builds, step for step, so the same config and seed train the same weights."""

from __future__ import annotations

import types

import pytest
import torch

from quality.training import TrainConfig, fit


class _Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return types.SimpleNamespace(loss=torch.nn.functional.mse_loss(self.linear(x), y))


def _batch(step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=generator)
    return {"x": x, "y": x.sum(dim=1, keepdim=True)}


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_give_the_same_training_as_the_prefetch_thread(workers):
    histories, weights = [], []
    for data_workers in (0, workers):
        model = _Regression()
        config = TrainConfig(steps=12, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=4, data_workers=data_workers)
        histories.append([h["loss"] for h in fit(model, _batch, config, lambda m: {}, log=lambda line: None)])
        weights.append(model.linear.weight.detach().clone())
    assert len(histories[0]) == 3 and histories[0] == histories[1]
    assert torch.equal(weights[0], weights[1])
