"""The visual-QA model shipped in the package, served by epdserve: it answers held-out generated
questions above a floor (so a serving-path change that corrupts images, embeddings, prompts or
KV shows up even where exactness tests cannot look), and its greedy answers are the ones HF
`transformers` gives for the same checkpoint."""

from __future__ import annotations

import pytest

from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.models.tiny import shipped_vqa_checkpoint
from epdserve.sdk import Client
from quality.eval_vqa import accuracy, hf_answers, served_answers

pytestmark = pytest.mark.e2e

SEEDS = range(120)           # held out: training used seeds from 1,000,000 on
ACCURACY_FLOOR = 0.9          # measured 0.998 on 500 held-out (transformers): docs/BENCHMARKS.md, "Quality"


@pytest.fixture(scope="module")
def model_dir():
    path = shipped_vqa_checkpoint()
    if path is None:
        pytest.skip("no shipped VQA checkpoint in this tree (epdserve/models/vqa_tiny)")
    return path


def test_served_answers_are_accurate_and_match_transformers(model_dir):
    with LocalCluster(ClusterConfig(model_dir=model_dir, device="cpu")) as cluster:
        with Client(cluster.router_address, timeout_s=60) as client:
            served = served_answers(client, SEEDS)
    reference = hf_answers(model_dir, SEEDS)
    mismatches = [(s, a, b) for s, a, b in zip(SEEDS, served, reference) if a != b]
    assert not mismatches, mismatches[:5]
    scores = accuracy(served, SEEDS)
    assert scores["all"] >= ACCURACY_FLOOR, scores


def test_quality_bench_runs_every_measurement_end_to_end(model_dir, tmp_path, capsys):
    """`epdserve bench quality` on a few questions: the predictor is trained by `epdserve sparsify
    train`, every scorer's keep-1.0 row is the lossless path (same answers), MOM changes no answer,
    and the JSON and table are written."""
    import json

    from epdserve.cli import main

    argv = ["bench", "quality", "--examples", "12", "--scorers", "cls-attention", "learned", "--keep-ratios", "1.0",
            "0.25", "--predictor-steps", "20", "--predictor-samples", "8", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    rows = {(r["scorer"], r["keep_ratio"]): r for r in result["sparsification"]}
    assert set(rows) == {("cls-attention", 1.0), ("cls-attention", 0.25), ("learned", 1.0), ("learned", 0.25)}
    assert rows["cls-attention", 1.0]["same_answers_as_lossless"] == 1.0
    assert rows["learned", 1.0]["same_answers_as_lossless"] == 1.0
    assert result["predictor"]["samples"] == 8
    assert result["mom"]["same_answers_as_lossless"] == 1.0
    table = (tmp_path / "quality.md").read_text()
    assert "| learned | 0.25 | 2 |" in table and "MOM" in table


def test_quality_bench_measures_fastkv_on_a_retrieval_checkpoint(tmp_path):
    """The FastKV and generated-token parts of `epdserve bench quality` on a random-weight
    checkpoint of the retrieval model's shape: every setting is served, and FastKV at rate 1.0
    answers exactly as the lossless path (it must reduce to it)."""
    import json

    from epdserve.cli import main
    from epdserve.models.tiny import build_tiny_checkpoint
    from quality.train_retrieval import RETRIEVAL_SPEC

    checkpoint = build_tiny_checkpoint(tmp_path / "retrieval", RETRIEVAL_SPEC)
    argv = ["bench", "quality", "--scorers", "--no-mom", "--examples", "0", "--retrieval-model", str(checkpoint),
            "--fastkv-contexts", "96", "--fastkv-rates", "1.0", "0.2", "--retrieval-examples", "10",
            "--text-keep-rates", "1.0", "0.5", "--copy-context", "128", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "quality.json").read_text())
    generated = result["generated_sparsification"]
    assert [row["text_keep_rate"] for row in generated] == [1.0, 0.5]
    assert generated[0]["same_answers_as_lossless"] == 1.0 and generated[1]["answer_bytes"] == 88
    assert "| 0.5 |" in (tmp_path / "out" / "quality.md").read_text()
    rows = {row["fastkv_rate"]: row for row in result["fastkv"]}
    assert set(rows) == {None, 1.0, 0.2}
    assert rows[1.0]["same_answers_as_lossless"] == 1.0 and rows[1.0]["copy"]["same_answers_as_lossless"] == 1.0
    assert rows[0.2]["copy"]["answer_bytes"] == 88
    assert all(row["context_tokens"] == 96 and set(row["by_depth"]) == {"0", "0.25", "0.5", "0.75", "1"}
               for row in rows.values())
