"""The generated retrieval task: pure in its seed, every queried key once in the context (filler is
letters only), the answer is that key's value, depth places the needle, the batcher scores
exactly the answer digits, and repeated-text examples score exactly their second copy."""

from __future__ import annotations

import re

import pytest

from quality.retrieval_data import ALPHABET, KEYS, example, repeat_example

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("tokens", [64, 256, 1024])
def test_examples_are_pure_and_answerable(tokens):
    for seed in range(20):
        e = example(seed, tokens, queries=3)
        assert e == example(seed, tokens, queries=3)
        needles = re.findall(rf"([{re.escape(KEYS)}])(\d)", e.context)
        assert len(needles) == 4 and len(e.prompt()) <= tokens
        assert re.sub(rf"[{re.escape(KEYS)}]\d", "", e.context).isalpha()   # filler: letters only
        keys = [k for k, _ in needles]
        assert len(set(keys)) == len(keys)
        for query in e.queries:
            assert dict(needles)[query.key] == query.value
        assert e.prompt() == e.context + f"?{e.queries[0].key}" and e.answer == e.queries[0].value


def test_depth_places_the_first_query():
    for depth in (0.0, 0.5, 1.0):
        e = example(7, 300, depth=depth)
        at = e.context.index(e.queries[0].key)
        assert abs(at / len(e.context) - depth) < 0.05 and e.depths[0] == depth


def test_the_batcher_scores_exactly_the_answer_digits(tiny_checkpoint):
    from transformers import AutoTokenizer

    from quality.train_retrieval import RetrievalBatcher

    batcher = RetrievalBatcher(AutoTokenizer.from_pretrained(tiny_checkpoint))
    examples = [example(1, 100, queries=2), example(2, 60, queries=2)]
    batch = batcher(examples)
    for labels, e in zip(batch["labels"], examples):
        scored = [int(t) for t in labels if t != -100]
        assert batcher.tokenizer.decode(scored) == "".join(q.value for q in e.queries)
    first_only = batcher(examples, queries_scored=1)["labels"][0]
    assert batcher.tokenizer.decode([int(t) for t in first_only if t != -100]) == examples[0].answer


@pytest.mark.parametrize("tokens", [48, 256, 4096])
def test_repeat_examples_score_the_second_copy(tokens):
    for seed in range(20):
        e = repeat_example(seed, tokens)
        assert e == repeat_example(seed, tokens)
        text, [(start, end)] = e.training_text()
        segment = text[e.repeated_from:]
        assert end == len(text) and start == e.repeated_from + 1 and 8 <= len(segment) <= 256
        assert abs(len(text) - tokens) <= 8 and set(segment) <= set(ALPHABET)
        assert text[:e.repeated_from].find(segment) >= 0      # the copy is earlier in the text
        assert "?" not in text
