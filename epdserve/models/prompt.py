"""Prompt -> token ids, with every image placeholder expanded to the image's token count.

Chat mode renders one user message with the checkpoint's chat template (images first, then
the text) as `apply_chat_template(..., add_generation_prompt=True)` does; raw mode tokenizes
the prompt as written. Either way the prompt must hold exactly one placeholder per image.
"""

from __future__ import annotations

import dataclasses

from epdserve.errors import FailedPreconditionError, InvalidArgumentError
from epdserve.models.spec import LlavaSpec


@dataclasses.dataclass(frozen=True)
class PromptTokens:
    token_ids: list[int]
    image_tokens: int           # how many of token_ids are image placeholder tokens


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

    def build(self, prompt: str, num_images: int, raw: bool, tokens_per_image: int | None = None) -> PromptTokens:
        """Token ids with each placeholder expanded to `tokens_per_image` image tokens (default: all
        of the image's tokens; fewer when the encode stage sparsifies)."""
        per_image = tokens_per_image or self.tokens_per_image
        ids = self.tokenizer(self.render(prompt, num_images, raw))["input_ids"]
        found = sum(1 for t in ids if t == self.image_token_id)
        if found != num_images:
            raise InvalidArgumentError(
                f"prompt: has {found} image placeholder(s) {self.placeholder!r} but {num_images} image(s) were given"
                + ("" if raw else " (in chat mode the images are placed for you: leave the placeholder out)")
            )
        expanded: list[int] = []
        for token in ids:
            expanded.extend([token] * per_image if token == self.image_token_id else [token])
        return PromptTokens(token_ids=expanded, image_tokens=num_images * per_image)

    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.spec.decoder.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))
