"""Generated long-context retrieval: multi-key needles in a haystack, in plain bytes (one token per
byte on the tiny tokenizer).

A context is filler (random lowercase letters) of about `context_tokens` tokens with needles in it:
a key symbol followed by a 1-digit value (`#4`), each key at most once. Queries `?#` are answered
by that key's value: `...qhzt#4wkcp...$7...?#4?$7`. Keys and values are single tokens, so a lookup
is one induction step; the haystack around them is what FastKV has to see through. Training
examples carry several needles and ask each (more signal per sequence); evaluation asks one, at
the end of the prompt, with its needle at a chosen depth.

Invariant: `example(seed, ...)` is a pure function of its arguments, every queried key occurs
exactly once in the context, the filler never contains a key, a digit or `?`, and answers are
exactly 1 digit.

Training also draws `repeat_example`s: a random string over the task's bytes, written twice, the
second copy scored. They teach the copy-what-followed-last-time circuit (induction head) densely;
on recall alone a small model stays at "some value from the context" (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import random
import string

KEYS = "#$%&@*+!^~"
ALPHABET = string.ascii_lowercase + string.digits + KEYS
NEEDLE_BYTES = 2               # "#4"
QUERY_BYTES = 2                # "?#"
TRAIN_SEED_BASE = 1_000_000    # training examples use seeds from here on; held-out ones are below it


@dataclasses.dataclass(frozen=True)
class Pair:
    key: str
    value: str


@dataclasses.dataclass(frozen=True)
class RetrievalExample:
    context: str
    queries: tuple[Pair, ...]   # asked in this order after the context
    depths: tuple[float, ...]   # where each queried needle sits in the context, 0 = start, 1 = end

    def prompt(self) -> str:
        """Context and the first query, for serving: the answer is the first query's value."""
        return self.context + f"?{self.queries[0].key}"

    @property
    def answer(self) -> str:
        return self.queries[0].value

    def training_text(self) -> tuple[str, list[tuple[int, int]]]:
        """Context and every query with its answer, and the (start, end) byte span of each answer."""
        text, spans = self.context, []
        for pair in self.queries:
            text += f"?{pair.key}"
            spans.append((len(text), len(text) + len(pair.value)))
            text += pair.value
        return text, spans


def example(seed: int, context_tokens: int, queries: int = 1, needles: int = 4,
            depth: float | None = None) -> RetrievalExample:
    """A context of about `context_tokens` tokens (the prompt adds a query) holding `needles`
    needles, `queries` of them asked; `depth` (0..1) places the first asked needle there, else all
    depths are drawn at random."""
    rng = random.Random(seed)
    needles = max(needles, queries)
    filler = max(needles, context_tokens - needles * NEEDLE_BYTES - QUERY_BYTES * queries - 1)
    depths = [rng.random() for _ in range(needles)]
    if depth is not None:
        depths[0] = depth
    pairs = [Pair(k, str(rng.randrange(10))) for k in rng.sample(KEYS, needles)]
    text = rng.choices(string.ascii_lowercase, k=filler)
    for pair, d in sorted(zip(pairs, depths), key=lambda item: -item[1]):  # from the end: offsets stay valid
        at = round(d * filler)
        text[at:at] = [pair.key + pair.value]
    return RetrievalExample("".join(text), tuple(pairs[:queries]), tuple(depths[:queries]))


@dataclasses.dataclass(frozen=True)
class RepeatExample:
    text: str
    repeated_from: int   # the second copy starts here

    def training_text(self) -> tuple[str, list[tuple[int, int]]]:
        """The text and the scored span: the second copy, less its first byte (not predictable)."""
        return self.text, [(self.repeated_from + 1, len(self.text))]

    def continuation(self, cue: int) -> tuple[str, str]:
        """A long-answer task: the prompt ends `cue` bytes into the second copy, the answer is the
        rest of it (the model has to keep its place in the copy as it generates)."""
        split = self.repeated_from + cue
        return self.text[:split], self.text[split:]


def repeat_example(seed: int, context_tokens: int, max_segment: int = 256, segment: int = 0) -> RepeatExample:
    """Letter filler, a random segment over ALPHABET (`segment` bytes, else 8..max_segment), more
    filler, the segment again at the end; about `context_tokens` bytes in all."""
    rng = random.Random(seed)
    segment = segment or rng.randint(8, max(8, min(max_segment, context_tokens // 3)))
    filler = max(0, context_tokens - 2 * segment)
    before = rng.randint(0, filler)
    copy = "".join(rng.choices(ALPHABET, k=segment))
    text = "".join(rng.choices(string.ascii_lowercase, k=before)) + copy + "".join(
        rng.choices(string.ascii_lowercase, k=filler - before))
    return RepeatExample(text + copy, len(text))
