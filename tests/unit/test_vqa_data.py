"""The generated visual questions: a pure function of the seed, every kind present, answers from
the right vocabulary, and scenes whose question names exactly one object."""

from __future__ import annotations

import collections
import random

import pytest

from quality.vqa_data import COLORS, COLUMNS, KINDS, LETTERS, SHAPES, _question, _scene, example


def test_same_seed_same_picture_question_and_answer():
    for seed in (0, 7, 123456):
        a, b = example(seed), example(seed)
        assert (a.png(), a.question, a.answer, a.kind) == (b.png(), b.question, b.answer, b.kind)
    assert len({example(s).png() for s in range(50)}) == 50


def test_answers_come_from_each_kinds_vocabulary():
    vocabulary = {"color": set(COLORS), "shape": set(SHAPES), "count": {"1", "2", "3"}, "where": set(COLUMNS),
                  "letter": set(LETTERS)}
    kinds = collections.Counter()
    for seed in range(600):
        e = example(seed)
        kinds[e.kind] += 1
        assert e.answer in vocabulary[e.kind], (seed, e)
        assert e.image.size == (48, 48) and e.image.mode == "RGB"
    assert set(kinds) == set(KINDS) and min(kinds.values()) > 60


@pytest.mark.parametrize("kind", ["color", "shape", "where"])
def test_a_question_names_exactly_one_object(kind):
    rng = random.Random(0)
    asked = 0
    for _ in range(400):
        shapes = _scene(rng)
        made = _question(kind, shapes, rng)
        if made is None:
            continue
        asked += 1
        question, answer = made
        attribute = "color" if kind == "shape" else "kind"
        target = [s for s in shapes if getattr(s, attribute) in question]
        assert len(target) == 1, (question, shapes)
        truth = {"color": target[0].color, "shape": target[0].kind, "where": COLUMNS[target[0].cell[0]]}[kind]
        assert answer == truth
    assert asked > 200
