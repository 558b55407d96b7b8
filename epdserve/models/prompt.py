"""Prompt -> token ids, with every image placeholder expanded to the image's token count.

Chat mode renders one user message with the checkpoint's chat template (images first, then
the text) as `apply_chat_template(..., add_generation_prompt=True)` does; raw mode tokenizes
the prompt as written. Either way the prompt must hold exactly one placeholder per image.

Tokenizing gives exactly `tokenizer(text)["input_ids"]`: a fast tokenizer whose encode path is
transformers' own (see `rust_backend`) is called through its Rust `tokenizers.Tokenizer`
directly while that backend is in the state transformers would put it in; any other tokenizer
or state goes through transformers.
"""

from __future__ import annotations

import dataclasses
import functools

from epdserve.errors import FailedPreconditionError, InvalidArgumentError
from epdserve.models.spec import LlavaSpec

ENCODE_METHODS = ("__call__", "_call_one", "encode_plus", "_encode_plus", "_batch_encode_plus",
                  "_get_padding_truncation_strategies", "set_truncation_and_padding", "_convert_encoding",
                  "_eventual_warn_about_too_long_sequence", "_switch_to_input_mode")


@dataclasses.dataclass(frozen=True)
class PromptTokens:
    token_ids: list[int]
    image_tokens: int           # how many of token_ids are image placeholder tokens


def rust_backend(tokenizer, methods: tuple[str, ...]):
    """The Rust `tokenizers.Tokenizer` that transformers' own `methods` of this tokenizer call, when
    the tokenizer is a transformers fast tokenizer and each of `methods` (and `backend_tokenizer`)
    is either transformers' generic fast-tokenizer implementation, not overridden by its class or
    on the instance, or defined by neither: calling the backend is then what those methods do.
    None otherwise (also without transformers)."""
    if not _generic_fast_class(type(tokenizer), methods):
        return None
    instance_attributes = vars(tokenizer)
    if any(name in instance_attributes for name in methods):
        return None
    return tokenizer.backend_tokenizer


@functools.lru_cache(maxsize=None)
def _generic_fast_class(cls: type, methods: tuple[str, ...]) -> bool:
    """`cls` is a transformers fast tokenizer class whose `methods` and `backend_tokenizer` are the
    generic fast tokenizer's own (or absent from both); checked once per class."""
    try:
        from transformers import PreTrainedTokenizerFast as generic
    except ImportError:
        return False
    if not issubclass(cls, generic):
        return False
    return all(getattr(cls, name, None) is getattr(generic, name, None) for name in (*methods, "backend_tokenizer"))


class PromptBuilder:
    def __init__(self, spec: LlavaSpec) -> None:
        from transformers import AutoTokenizer

        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
        self.image_token_id = spec.image_token_id
        self.placeholder = self.tokenizer.convert_ids_to_tokens(spec.image_token_id)
        self.tokens_per_image = spec.tokens_per_image

    def render(self, prompt: str, num_images: int, raw: bool) -> str:
        if raw:
            return prompt
        if not self.tokenizer.chat_template:
            raise FailedPreconditionError("this checkpoint has no chat template: send the prompt with raw=true")
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def encode(self, text: str) -> list[int]:
        """Exactly `self.tokenizer(text)["input_ids"]`."""
        ids = self._rust_encode(text)
        return self.tokenizer(text)["input_ids"] if ids is None else ids

    def _rust_encode(self, text: str) -> list[int] | None:
        """The backend's ids when its settings are those `tokenizer(text)` runs it with (no
        truncation, no padding, special tokens split as `split_special_tokens` says) and the ids
        are not too long for the model (transformers then logs a warning); else None."""
        backend = rust_backend(self.tokenizer, ENCODE_METHODS)
        if backend is None or not _set_as_transformers_calls_it(backend, self.tokenizer):
            return None
        ids = backend.encode(text, add_special_tokens=True).ids
        limit = self.tokenizer.model_max_length
        return None if len(ids) > limit and limit != 0 else ids

    def build(self, prompt: str, num_images: int, raw: bool, tokens_per_image: int | None = None) -> PromptTokens:
        """Token ids with each placeholder expanded to `tokens_per_image` image tokens (default: all
        of the image's tokens; fewer when the encode stage sparsifies)."""
        per_image = tokens_per_image or self.tokens_per_image
        ids = self.encode(self.render(prompt, num_images, raw))
        found = ids.count(self.image_token_id)
        if found != num_images:
            raise InvalidArgumentError(
                f"prompt: has {found} image placeholder(s) {self.placeholder!r} but {num_images} image(s) were given"
                + ("" if raw else " (in chat mode the images are placed for you: leave the placeholder out)")
            )
        return PromptTokens(token_ids=_expand(ids, self.image_token_id, found, per_image),
                            image_tokens=num_images * per_image)

    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.spec.decoder.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))


def _set_as_transformers_calls_it(backend, tokenizer) -> bool:
    """`tokenizer(text)` would run `backend` as it is set now: no truncation, no padding, and
    special tokens split or not as the tokenizer's `split_special_tokens` says."""
    split = getattr(backend, "encode_special_tokens", None) == getattr(tokenizer, "split_special_tokens", None)
    return backend.truncation is None and backend.padding is None and split


def _expand(ids, token: int, occurrences: int, copies: int) -> list[int]:
    """A new list: `ids` with each of its `occurrences` of `token` repeated `copies` times."""
    expanded: list[int] = []
    start = 0
    for _ in range(occurrences):
        at = ids.index(token, start)
        expanded += ids[start:at]
        expanded += [token] * copies
        start = at + 1
    expanded += ids[start:]
    return expanded
