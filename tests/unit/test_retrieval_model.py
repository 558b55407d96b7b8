"""The shipped long-context retrieval checkpoint still answers held-out needles (guards the file and
the task generator it was trained on), and training goes on from a checkpoint (`--start-from`),
keeping the earlier runs' records."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

pytestmark = pytest.mark.unit

CHECKPOINT = pathlib.Path(__file__).resolve().parents[2] / "quality" / "checkpoints" / "retrieval-16k"


def test_the_shipped_retrieval_model_finds_needles_in_long_contexts():
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from quality.train_retrieval import RetrievalBatcher, exact_match

    if not (CHECKPOINT / "model.safetensors").is_file():
        pytest.skip("no trained retrieval checkpoint in this tree")
    model = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()
    batcher = RetrievalBatcher(AutoTokenizer.from_pretrained(CHECKPOINT))
    assert exact_match(model, batcher, range(40), 1024, batch_size=20) >= 0.85   # measured 0.96 at 4k


def test_training_goes_on_from_a_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from quality.train_retrieval import RetrievalTask, train
    from quality.training import TrainConfig

    config = TrainConfig(steps=2, batch_size=4, eval_every=2, eval_examples=4)
    task = RetrievalTask(min_tokens=32, max_tokens=48)
    train(tmp_path / "first", config, task, log=lambda line: None)
    report = train(tmp_path / "second", config, task, log=lambda line: None, start_from=tmp_path / "first")
    first = json.loads((tmp_path / "first" / "training.json").read_text())
    assert report["earlier_runs"] == [first] and "earlier_runs" not in first
    assert json.loads((tmp_path / "second" / "training.json").read_text()) == json.loads(json.dumps(report))
    before, after = (load_file(tmp_path / name / "model.safetensors") for name in ("first", "second"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "second" / "tokenizer.json").is_file()
