"""Token ids -> streamed text: whole code points only, and stop strings cut out.

IncrementalDetokenizer re-decodes a small window (prefix_offset..end) so tokenizers that
need left context (SentencePiece spaces, byte-level UTF-8 sequences split across tokens)
stream exactly what a full decode would give; text ending in an incomplete UTF-8 sequence
(U+FFFD) is held back until the next token completes it. Every decode gives exactly
`tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`: for a fast
tokenizer with transformers' own decode (see `rust_backend`) that is its Rust backend's
`decode(ids, skip_special_tokens=True)`, called directly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from epdserve.models.prompt import rust_backend

REPLACEMENT = "\ufffd"
DECODE_METHODS = ("decode", "_decode")


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """ids -> `tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`."""
    backend = rust_backend(tokenizer, DECODE_METHODS)
    if backend is not None:
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, context_ids: list[int], *, context_tokens: int = 5) -> None:
        self.tokenizer = tokenizer
        self._decode = text_decoder(tokenizer)
        self.ids = list(context_ids[-context_tokens:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly completed text (possibly "")."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of generation (may hold U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]


@dataclasses.dataclass
class StopResult:
    text: str          # text safe to emit now
    stopped: bool      # a stop string was found; text ends right before it


class StopStringMatcher:
    """Holds back the shortest tail that could still grow into a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def push(self, text: str) -> StopResult:
        if not self.stops:
            return StopResult(text, False)
        buffer = self.held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return StopResult(buffer[:cut], True)
        keep = self._partial_tail(buffer)
        self.held = buffer[len(buffer) - keep :] if keep else ""
        return StopResult(buffer[: len(buffer) - keep], False)

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text
