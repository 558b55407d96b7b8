"""Trace readers, the canonical writer, the synthetic generator and the `tuner trace` commands (real
traces from ../shared/traces when present)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from tuner.cli import main as tuner_main
from tuner.synth import SynthSpec, add_images, parse_spec, rescale, synthesize
from tuner.traces import TraceImage, TraceRequest, read_trace, summarize, write_trace

pytestmark = pytest.mark.unit
TRACES = pathlib.Path(__file__).resolve().parents[3] / "shared" / "traces"
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason="../shared/traces not present")
SMALL = SynthSpec(requests=300, image_fraction=0.6, session_turns=2.0, think_time_s=5.0)


def _jsonl(path: pathlib.Path, rows: list) -> pathlib.Path:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


def _gap_cv(requests: list[TraceRequest]) -> float:
    gaps = np.diff([r.arrival_s for r in requests])
    return float(gaps.std() / gaps.mean())


# --- readers and the writer -------------------------------------------------------------------------

def test_azure_multimodal_csv_draws_images_deterministically(tmp_path):
    path = tmp_path / "lmm.csv"
    path.write_text("TIMESTAMP,NumImages,ContextTokens,GeneratedTokens\n"
                    "2024-10-15T12:00:07.319Z,3,100,5\n2024-10-15T12:00:05.819Z,1,949,126\n")
    requests = read_trace(path)
    assert [r.num_images for r in requests] == [1, 3]            # sorted by arrival
    assert requests[1].arrival_s == pytest.approx(1.5)
    sizes = {(s.width, s.height) for s in SynthSpec().sizes}
    assert all((image.width, image.height) in sizes for r in requests for image in r.images)
    assert read_trace(path) == requests
    assert read_trace(path, image_spec=SynthSpec(seed=1)) != requests


def test_burstgpt_and_vidur_csv(tmp_path):
    burst = tmp_path / "burst.csv"
    burst.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                     "5,ChatGPT,472,18,490,Conversation log\n2.5,GPT-4,1087,0,1087,API log\n")
    assert [(r.arrival_s, r.context_tokens, r.generated_tokens) for r in read_trace(burst)] == [
        (0.0, 1087, 0), (2.5, 472, 18)]
    vidur = tmp_path / "vidur.csv"
    vidur.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,100,10\n0.25,200,20\n")
    assert summarize(read_trace(vidur)).mean_rate_rps == pytest.approx(8.0)


def test_mooncake_prefix_reuse(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [
        {"timestamp": 0, "input_length": 1024, "output_length": 4, "hash_ids": [1, 2]},
        {"timestamp": 500, "input_length": 1536, "output_length": 8, "hash_ids": [1, 2, 3]}])
    stats = summarize(read_trace(path))
    assert stats.prefix_reuse == pytest.approx(2 / 5)
    assert stats.image_reuse is None
    assert stats.duration_s == pytest.approx(0.5)


def test_canonical_fields_and_delay_only_follow_ups(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [
        {"timestamp": 1500, "input_length": 812, "output_length": 128, "hash_ids": [0, 17], "session_id": "s-42",
         "delay_ms": 0, "images": [{"hash": "a9f3", "width": 1280, "height": 720}]},
        {"session_id": "s-42", "delay": 2000, "input_length": 1000, "output_length": 9},
        {"timestamp": 1000, "input_length": 5, "output_length": 1}])
    first, opening, follow_up = read_trace(path)
    assert first.arrival_s == 0.0 and opening.arrival_s == 0.5 and follow_up.arrival_s == 2.5
    assert opening.images == (TraceImage("a9f3", 1280, 720),) and opening.num_images == 1
    assert (follow_up.session_id, follow_up.delay_s) == ("s-42", 2.0)


def test_write_read_round_trip(tmp_path):
    trace = synthesize(SMALL)
    assert any(r.images for r in trace) and any(r.delay_s for r in trace) and any(r.session_id for r in trace)
    write_trace(tmp_path / "t.jsonl", trace)
    assert read_trace(tmp_path / "t.jsonl") == trace
    shifted = [dataclasses.replace(r, arrival_s=r.arrival_s + 7.0) for r in reversed(trace)]
    write_trace(tmp_path / "s.jsonl", shifted)                   # timestamps relative to the first request
    assert read_trace(tmp_path / "s.jsonl") == trace


@pytest.mark.parametrize("rows, message", [
    ([{"timestamp": 0, "input_length": -3, "output_length": 1}], "t.jsonl:1: field 'input_length' must be >= 0"),
    ([{"timestamp": 0, "input_length": 3}], "t.jsonl:1: missing field 'output_length'"),
    (["", '{"timestamp": 0, "input_length": 1, "output_length": 1}', "{oops"], "t.jsonl:3: not JSON"),
    ([{"input_length": 1, "output_length": 1}], "t.jsonl:1: missing field 'timestamp'"),
    ([{"timestamp": 0, "input_length": 1.5, "output_length": 1}], "field 'input_length' must be a whole number"),
    ([{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": "x"}], "field 'hash_ids'"),
    ([{"timestamp": 0, "input_length": 1, "output_length": 1, "images": [{"width": 2, "height": 2}]}],
     "t.jsonl:1: images[0]: missing field 'hash'"),
    ([""], "t.jsonl: empty trace"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, rows, message):
    path = _jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_trace(path)


def test_malformed_csv_names_file_line_and_column(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n"
                    "2023-11-16 18:15:47.00,-1,3\n")
    with pytest.raises(ValueError, match="a.csv:3: column 'ContextTokens'"):
        read_trace(path)
    path.write_text("when,tokens\n1,2\n")
    with pytest.raises(ValueError, match="unknown CSV columns"):
        read_trace(path)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(ValueError, match="empty trace"):
        read_trace(path)


def test_unknown_format_is_an_error(tmp_path):
    path = tmp_path / "trace.txt"
    path.write_text("x")
    assert tuner_main(["trace", "stats", str(path)]) == 1


@needs_traces
def test_real_traces_match_their_published_shape(capsys):
    azure = summarize(read_trace(TRACES / "azure_llm_conv_2023.csv"))
    assert azure.requests > 19_000 and 1000 < azure.context_tokens["mean"] < 1300
    assert azure.image_reuse is None and azure.images_per_request["mean"] == 0
    mooncake = summarize(read_trace(TRACES / "mooncake_conversation.jsonl"))
    assert mooncake.requests == 12_031
    assert mooncake.context_tokens["mean"] == pytest.approx(12_035, rel=0.01)  # FAST'25: average input 12,035
    assert 0.3 < mooncake.prefix_reuse < 0.5                                   # FAST'25: ~40% cache ratio
    assert tuner_main(["trace", "stats", "--json", str(TRACES / "mooncake_conversation.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 12_031


@needs_traces
def test_real_mooncake_survives_canonical_round_trip(tmp_path):
    trace = read_trace(TRACES / "mooncake_conversation.jsonl")[:2000]
    write_trace(tmp_path / "m.jsonl", trace)
    assert read_trace(tmp_path / "m.jsonl") == trace
    assert (tmp_path / "m.jsonl").read_text().splitlines()[0] == (TRACES / "mooncake_conversation.jsonl").open(
    ).readline().strip()                                         # text-only canonical == plain Mooncake


# --- the synthetic generator ------------------------------------------------------------------------

def test_synth_is_reproducible():
    assert synthesize(SMALL) == synthesize(SMALL)
    assert synthesize(SMALL) != synthesize(dataclasses.replace(SMALL, seed=1))


def test_synth_rate_and_lengths_follow_the_spec():
    trace = synthesize(SynthSpec(requests=1000, rate_rps=4.0))
    stats = summarize(trace)
    assert stats.mean_rate_rps == pytest.approx(4.0, rel=0.10)
    assert 0.8 < _gap_cv(trace) < 1.2                             # Poisson: exponential gaps
    assert stats.context_tokens["p50"] == pytest.approx(800, rel=0.15)
    spec = SynthSpec()
    assert all(spec.text_min <= r.context_tokens <= spec.text_max for r in trace)
    assert all(r.num_images <= spec.max_images for r in trace)
    assert sum(r.num_images > 0 for r in trace) / len(trace) == pytest.approx(spec.image_fraction, abs=0.05)


def test_image_heavy_spec_floors_the_image_count():
    heavy = synthesize(parse_spec("requests=400,images=1,images_mean=5,min_images=4,max_images=8"))
    counts = [r.num_images for r in heavy]
    assert min(counts) == 4 and max(counts) == 8
    assert 4.5 < sum(counts) / len(counts) < 6.5
    default = synthesize(SMALL)
    assert min(r.num_images for r in default if r.num_images) == 1


def test_burstiness_raises_the_inter_arrival_cv():
    bursty = synthesize(SynthSpec(arrivals="bursty", burstiness=3.0, requests=2000))
    assert _gap_cv(bursty) > 2.0
    assert summarize(bursty).mean_rate_rps == pytest.approx(4.0, rel=0.25)  # CV 3 -> 2000 gaps: ~7% noise


@pytest.mark.parametrize("reuse", [0.0, 0.2, 0.5])
def test_image_reuse_close_to_the_spec(reuse):
    stats = summarize(synthesize(SynthSpec(image_fraction=0.6, image_reuse=reuse)))
    assert stats.image_reuse == pytest.approx(reuse, abs=0.04)


def test_shared_system_prompts_and_sessions_reuse_prefix_blocks():
    assert summarize(synthesize(SynthSpec(prefix_share=0.0))).prefix_reuse == 0.0
    assert summarize(synthesize(SynthSpec(prefix_share=1.0))).prefix_reuse > 0.1
    trace = synthesize(SMALL)
    latest: dict[str, TraceRequest] = {}
    follow_ups = 0
    for request in trace:
        prior = latest.get(request.session_id)
        if prior is not None:
            follow_ups += 1
            kept = prior.context_tokens // 512
            assert request.prefix_blocks[:kept] == prior.prefix_blocks[:kept]
            assert request.images[:prior.num_images] == prior.images        # history re-sent
            assert request.context_tokens > prior.context_tokens + prior.generated_tokens
            assert request.arrival_s == pytest.approx(prior.arrival_s + request.delay_s)
        latest[request.session_id] = request
    assert follow_ups > 50


def test_parse_spec_accepts_aliases_and_field_names():
    spec = parse_spec(" rate=4 , requests=1000,images=0.6,reuse=0.2,arrivals=bursty,text_median=300,"
                      "sizes=1280x720:3|640x480,seed=7,")
    assert (spec.rate_rps, spec.requests, spec.image_fraction, spec.image_reuse) == (4.0, 1000, 0.6, 0.2)
    assert (spec.arrivals, spec.text_median, spec.seed) == ("bursty", 300, 7)
    assert [(s.width, s.height, s.weight) for s in spec.sizes] == [(1280, 720, 3.0), (640, 480, 1.0)]
    assert parse_spec("") == SynthSpec()


@pytest.mark.parametrize("text, message", [
    ("rat=4", "unknown key 'rat' .*accepted: rate"),
    ("rate=fast", "rate='fast': expected a number > 0"),
    ("rate=-1", "rate='-1': expected a number > 0"),
    ("arrivals=uniform", "arrivals='uniform': expected one of poisson, bursty"),
    ("images=1.5", "images='1.5': expected a fraction in \\[0, 1\\]"),
    ("requests=2.5", "requests='2.5': expected a number >= 1"),
    ("sizes=1280by720", "sizes='1280by720': expected WxH"),
    ("rate", "'rate' needs a value"),
    ("output_min=50,output_max=10", "output_min must be <= output_max"),
    ("min_images=9", "min_images must be <= max_images"),
])
def test_parse_spec_rejects_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(text)


def test_rescale_hits_the_target_rate_and_keeps_order():
    trace = synthesize(SynthSpec(requests=500))
    faster = rescale(trace, 20.0)
    assert summarize(faster).mean_rate_rps == pytest.approx(20.0)
    assert [r.context_tokens for r in faster] == [r.context_tokens for r in trace]
    ratio = faster[-1].arrival_s / trace[-1].arrival_s
    assert all(f.arrival_s == pytest.approx(t.arrival_s * ratio) for f, t in zip(faster, trace))
    with pytest.raises(ValueError):
        rescale(trace[:1], 1.0)


def test_add_images_to_a_text_trace():
    text_only = [dataclasses.replace(r, images=()) for r in synthesize(SynthSpec(requests=400))]
    spec = SynthSpec(image_fraction=0.5, image_reuse=0.3)
    multimodal = add_images(text_only, spec)
    assert multimodal == add_images(text_only, spec)
    assert [r.context_tokens for r in multimodal] == [r.context_tokens for r in text_only]
    assert summarize(multimodal).image_reuse == pytest.approx(0.3, abs=0.06)


# --- the commands -------------------------------------------------------------------------------------

def test_cli_synth_stats_convert(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert tuner_main(["trace", "synth", "--spec", "requests=200,images=0.6,reuse=0.2", "--seed", "3",
                       "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"{out}: 200 requests") and "reused" in line and line.count("\n") == 1
    assert read_trace(out) == synthesize(SynthSpec(requests=200, image_fraction=0.6, image_reuse=0.2, seed=3))

    assert tuner_main(["trace", "stats", str(out)]) == 0
    assert "image reuse" in capsys.readouterr().out
    assert tuner_main(["trace", "stats", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["image_reuse"] is not None

    lmm = tmp_path / "lmm.csv"
    lmm.write_text("TIMESTAMP,NumImages,ContextTokens,GeneratedTokens\n"
                   "2024-10-15T12:00:05.819Z,1,949,126\n2024-10-15T12:00:07.319Z,2,100,5\n")
    converted = tmp_path / "lmm.jsonl"
    assert tuner_main(["trace", "convert", str(lmm), "--out", str(converted), "--rate", "4"]) == 0
    assert [r.num_images for r in read_trace(converted)] == [1, 2]
    assert summarize(read_trace(converted)).mean_rate_rps == pytest.approx(4.0)


def test_cli_convert_adds_images_and_reports_bad_specs(tmp_path, capsys):
    source = tmp_path / "m.jsonl"
    write_trace(source, [dataclasses.replace(r, images=()) for r in synthesize(SynthSpec(requests=100))])
    out = tmp_path / "mm.jsonl"
    assert tuner_main(["trace", "convert", str(source), "--out", str(out), "--add-images",
                       "--spec", "images=1"]) == 0
    assert all(r.images for r in read_trace(out))
    capsys.readouterr()
    assert tuner_main(["trace", "synth", "--spec", "arrivals=uniform", "--out", str(out)]) == 1
    assert "arrivals='uniform': expected one of poisson, bursty" in capsys.readouterr().err
