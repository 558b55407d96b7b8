"""Sampling parameter validation and seeded per-step sampling."""

from __future__ import annotations

import math

import pytest
import torch

from epdserve.engine.sampler import SamplingParams, sample_token
from epdserve.errors import InvalidArgumentError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgumentError, match=field):
        SamplingParams(**kwargs)


def test_greedy_is_argmax():
    logits = torch.randn(100)
    assert sample_token(logits, SamplingParams(temperature=0.0), 0) == int(logits.argmax())


def test_same_seed_and_step_gives_same_token_other_steps_vary():
    logits = torch.zeros(1000)
    params = SamplingParams(temperature=1.0, seed=1234)
    assert sample_token(logits, params, 5) == sample_token(logits, params, 5)
    assert len({sample_token(logits, params, step) for step in range(20)}) > 10


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(50)
    best = int(logits.argmax())
    for step in range(10):
        assert sample_token(logits, SamplingParams(temperature=1.0, top_k=1, seed=step), step) == best
        assert sample_token(logits, SamplingParams(temperature=1.0, top_p=1e-6, seed=step), step) == best


def test_top_k_restricts_support():
    logits = torch.arange(10, dtype=torch.float32)
    seen = {sample_token(logits, SamplingParams(temperature=5.0, top_k=3, seed=s), 0) for s in range(200)}
    assert seen == {7, 8, 9}


def test_top_p_restricts_support():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    seen = {sample_token(probs.log(), SamplingParams(temperature=1.0, top_p=0.7, seed=s), 0) for s in range(300)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    counts = torch.zeros(3)
    for s in range(2000):
        counts[sample_token(probs.log(), SamplingParams(temperature=1.0, seed=s), 0)] += 1
    assert torch.allclose(counts / 2000, probs, atol=0.04)
