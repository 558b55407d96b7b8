"""Streaming text: whole code points only, equal to a full decode; stop strings cut out exactly."""

from __future__ import annotations

import pytest

from services.router.text import IncrementalDetokenizer, StopStringMatcher

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("text", ["plain ascii", "ünïcödé 🙂 emoji, 中文, עברית, e\u0301", "👩‍👩‍👧 zwj\x00nul"])
def test_incremental_equals_full_decode_and_never_splits_code_points(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [tokenizer.bos_token_id])
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p]) or text.isascii()


def test_incomplete_tail_is_flushed_with_replacement(tokenizer):
    ids = tokenizer("é", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2  # byte-level: two UTF-8 bytes
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.push(ids[0]) == ""
    assert detok.flush() == "\ufffd"


def test_stop_string_split_across_pushes():
    matcher = StopStringMatcher(("STOP",))
    out = [matcher.push(t) for t in ["hello S", "T", "OP and more"]]
    assert "".join(r.text for r in out) == "hello "
    assert [r.stopped for r in out] == [False, False, True]


def test_partial_match_that_fails_is_released():
    matcher = StopStringMatcher(("STOP",))
    first = matcher.push("abc ST")
    assert first.text == "abc " and not first.stopped
    second = matcher.push("ART")
    assert second.text == "START" and not second.stopped
    assert matcher.flush() == ""


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(("world", "lo"))
    result = matcher.push("hello world")
    assert result.stopped and result.text == "hel"


def test_no_stop_strings_passes_through():
    matcher = StopStringMatcher(())
    assert matcher.push("anything").text == "anything"
