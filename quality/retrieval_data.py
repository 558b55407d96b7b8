"""Generated long-context retrieval: multi-key associative recall in plain bytes (one token per
byte on the tiny tokenizer).

A context is `key=value;` pairs (keys: 3 lowercase letters, unique within the context; values: 2
digits) filling about `context_tokens` tokens, then queries `?key=` each answered by that key's
value: `abc=42;xyz=07;...?xyz=07?abc=42`. Training examples carry several queries (more signal per
sequence); evaluation asks one, at the end of the prompt, at a controlled depth of the context.

Invariant: `example(seed, ...)` is a pure function of its arguments, every queried key occurs
exactly once in the context, and a value is never a prefix of another token the answer could run
into (answers are exactly 2 digits).
"""

from __future__ import annotations

import dataclasses
import random
import string

PAIR_BYTES = 7                 # "abc=42;"
QUERY_BYTES = 5                # "?abc="
TRAIN_SEED_BASE = 1_000_000    # training examples use seeds from here on; held-out ones are below it


@dataclasses.dataclass(frozen=True)
class Pair:
    key: str
    value: str


@dataclasses.dataclass(frozen=True)
class RetrievalExample:
    context: str
    queries: tuple[Pair, ...]   # asked in this order after the context
    depths: tuple[float, ...]   # where each queried pair sits in the context, 0 = first pair, 1 = last

    def prompt(self) -> str:
        """Context and the first query, for serving: the answer is the first query's value."""
        return self.context + f"?{self.queries[0].key}="

    @property
    def answer(self) -> str:
        return self.queries[0].value

    def training_text(self) -> tuple[str, list[tuple[int, int]]]:
        """Context and every query with its answer, and the (start, end) byte span of each answer."""
        text, spans = self.context, []
        for pair in self.queries:
            text += f"?{pair.key}="
            spans.append((len(text), len(text) + len(pair.value)))
            text += pair.value
        return text, spans


def example(seed: int, context_tokens: int, queries: int = 1, depth: float | None = None) -> RetrievalExample:
    """Pairs filling about `context_tokens` tokens (at least 2 pairs), then `queries` distinct keys
    to look up; `depth` (0..1) places the first query's pair there, else it is drawn at random."""
    rng = random.Random(seed)
    count = max(2, (context_tokens - QUERY_BYTES * queries - 1) // PAIR_BYTES)
    keys = _distinct_keys(rng, count)
    pairs = [Pair(k, f"{rng.randrange(100):02d}") for k in keys]
    order = rng.sample(range(count), min(queries, count))
    if depth is not None:
        target = min(count - 1, round(depth * (count - 1)))
        order = [target] + [i for i in order if i != target][: len(order) - 1]
    context = "".join(f"{p.key}={p.value};" for p in pairs)
    return RetrievalExample(context, tuple(pairs[i] for i in order), tuple(i / max(1, count - 1) for i in order))


def _distinct_keys(rng: random.Random, count: int) -> list[str]:
    keys: dict[str, None] = {}
    while len(keys) < count:
        keys["".join(rng.choices(string.ascii_lowercase, k=3))] = None
    return list(keys)
