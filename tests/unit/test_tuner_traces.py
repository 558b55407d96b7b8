"""Trace readers and summaries (real traces from ../shared/traces when present)."""

from __future__ import annotations

import json
import pathlib

import pytest

from tuner.cli import main as tuner_main
from tuner.traces import read_trace, summarize

pytestmark = pytest.mark.unit
TRACES = pathlib.Path(__file__).resolve().parents[3] / "shared" / "traces"


def test_azure_multimodal_csv(tmp_path):
    path = tmp_path / "lmm.csv"
    path.write_text("TIMESTAMP,NumImages,ContextTokens,GeneratedTokens\n"
                    "2024-10-15T12:00:05.819Z,1,949,126\n2024-10-15T12:00:07.319Z,3,100,5\n")
    requests = read_trace(path)
    assert [r.num_images for r in requests] == [1, 3]
    assert requests[1].arrival_s == pytest.approx(1.5)


def test_mooncake_prefix_reuse(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"timestamp": 0, "input_length": 1024, "output_length": 4, "hash_ids": [1, 2]},
            {"timestamp": 500, "input_length": 1536, "output_length": 8, "hash_ids": [1, 2, 3]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    stats = summarize(read_trace(path))
    assert stats.prefix_reuse == pytest.approx(2 / 5)
    assert stats.duration_s == pytest.approx(0.5)


def test_unknown_format_is_an_error(tmp_path):
    path = tmp_path / "trace.txt"
    path.write_text("x")
    assert tuner_main(["trace", "stats", str(path)]) == 1


@pytest.mark.skipif(not TRACES.is_dir(), reason="../shared/traces not present")
def test_real_traces_match_their_published_shape(capsys):
    azure = summarize(read_trace(TRACES / "azure_llm_conv_2023.csv"))
    assert azure.requests > 19_000 and 1000 < azure.context_tokens["mean"] < 1300
    mooncake = summarize(read_trace(TRACES / "mooncake_conversation.jsonl"))
    assert mooncake.requests == 12_031
    assert mooncake.context_tokens["mean"] == pytest.approx(12_035, rel=0.01)  # FAST'25: average input 12,035
    assert 0.3 < mooncake.prefix_reuse < 0.5                                   # FAST'25: ~40% cache ratio
    assert tuner_main(["trace", "stats", "--json", str(TRACES / "mooncake_conversation.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 12_031
