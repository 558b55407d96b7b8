"""The router's Rust tokenizer fast paths give exactly what transformers gives.

Detokenizing (`IncrementalDetokenizer`) and tokenizing (`PromptBuilder.encode` / `build`) call a
fast tokenizer's `tokenizers.Tokenizer` directly; each test runs the same input through
transformers' own `decode` (the same tokenizer behind a wrapper that hides its backend) or
`__call__` (a second instance of it) and requires identical streamed chunks and identical ids.
Tokenizers: the tiny checkpoints' byte-level BPE, a SentencePiece-style BPE (Metaspace, byte
fallback, a decoder that strips the leading space), and variants with added (non-special) tokens
or cleanup on by default.
"""

from __future__ import annotations

import logging
import random
import shutil
import sys

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from epdserve.models.prompt import ENCODE_METHODS, PromptBuilder, rust_backend
from epdserve.models.spec import load_spec
from services.router.text import DECODE_METHODS, IncrementalDetokenizer, text_decoder

pytestmark = pytest.mark.unit

PIECES = ["a", "the", " ", "  ", "\n", "\t", "é", "ü", "ß", "中文", "日本語", "עברית", "مرحبا", "🙂", "👩‍👩‍👧", "🇺🇳",
          "e\u0301", "\x00", "\u200b", "\ufffd", "<image>", "<s>", "</s>", "<extra>", " ,", " .", "n't", "€", "𝄞"]
PROMPTS = ["Describe a quiet harbour at dawn in one short sentence.", "", " ", "  leading and trailing  ",
           "ünïcödé 🙂 emoji, 中文, עברית, e\u0301", "👩‍👩‍👧 zwj\x00nul", "tabs\tand\nnewlines\r\n",
           "USER: <image>\nfirst <image> second\nASSISTANT:", "<s>special</s> <pad> text", "don't , stop .",
           "𝄞" * 40 + "中" * 40, "word " * 300]


class TransformersOnly:
    """A tokenizer with its Rust backend hidden: every call goes through transformers."""

    def __init__(self, tokenizer) -> None:
        self._wrapped = tokenizer

    def decode(self, *args, **kwargs):
        return self._wrapped.decode(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)


def _sentencepiece_style():
    """A Llama-1/2-like tokenizer: Metaspace BPE with byte fallback, decoded with a leading-space strip."""
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for symbol in ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the", "▁a", "in", "▁in"]:
        vocab.setdefault(symbol, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "n"), ("▁", "in")]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True),
                                AddedToken("<image>", special=True)])
    backend.add_tokens([AddedToken("<extra>", special=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _load(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama+added", "llama+cleanup", "sentencepiece"])
def tokenizer(request, tiny_checkpoint_factory):
    if request.param == "sentencepiece":
        return _sentencepiece_style()
    backbone, _, variant = request.param.partition("+")
    tok = _load(tiny_checkpoint_factory(backbone, "clip" if backbone == "llama" else "siglip", 0))
    if variant == "added":
        tok.add_tokens([AddedToken("<extra>", special=False), AddedToken(" spaced ", special=False)])
    if variant == "cleanup":
        tok.clean_up_tokenization_spaces = True
    return tok


def _random_ids(tok, rng: random.Random) -> list[int]:
    """Ids from text (multibyte UTF-8 split across byte-level tokens), with special, placeholder and
    arbitrary vocabulary ids mixed in, sometimes cut mid-character."""
    text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    specials = [i for i in (tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<image>")) if i is not None]
    for _ in range(rng.randint(0, 4)):
        ids.insert(rng.randint(0, len(ids)), rng.choice(specials + [rng.randrange(len(tok))]))
    return ids[: rng.randint(0, len(ids))] if rng.random() < 0.3 else ids


def _stream(tokenizer, context: list[int], ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, context)
    return [detok.push(t) for t in ids] + [detok.flush()]


def test_fast_paths_are_taken(tokenizer):
    assert rust_backend(tokenizer, DECODE_METHODS) is tokenizer.backend_tokenizer
    assert rust_backend(tokenizer, ENCODE_METHODS) is tokenizer.backend_tokenizer
    assert rust_backend(TransformersOnly(tokenizer), DECODE_METHODS) is None


def test_decoder_equals_transformers_decode(tokenizer):
    rng = random.Random(1)
    decode = text_decoder(tokenizer)
    for _ in range(300):
        ids = _random_ids(tokenizer, rng) if rng.random() < 0.7 else [rng.randrange(len(tokenizer))
                                                                      for _ in range(rng.randint(0, 8))]
        expected = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert decode(ids) == expected, ids


def test_streamed_chunks_equal_transformers_path(tokenizer):
    rng = random.Random(2)
    held_back = 0
    for _ in range(300):
        context = _random_ids(tokenizer, rng)[-rng.randint(0, 12):]
        ids = _random_ids(tokenizer, rng)
        chunks = _stream(tokenizer, context, ids)
        assert chunks == _stream(TransformersOnly(tokenizer), context, ids), (context, ids)
        held_back += sum(1 for c in chunks[:-1] if not c)
    assert held_back > 100  # incomplete UTF-8 and special tokens were held back / skipped along the way


def test_streaming_special_and_placeholder_tokens(tokenizer):
    image = tokenizer.convert_tokens_to_ids("<image>")
    text_ids = tokenizer("é🙂 the 中", add_special_tokens=False)["input_ids"]
    for ids in ([image] + text_ids + [tokenizer.eos_token_id], [tokenizer.bos_token_id, image, image], text_ids[:1]):
        assert _stream(tokenizer, [tokenizer.bos_token_id], ids) == _stream(TransformersOnly(tokenizer),
                                                                             [tokenizer.bos_token_id], ids)


@pytest.fixture(scope="module")
def builders(tokenizer, tiny_checkpoint_factory, tmp_path_factory):
    """(PromptBuilder with `tokenizer`'s files, a separate transformers instance of them)."""
    model_dir = tmp_path_factory.mktemp("checkpoint") / "model"
    shutil.copytree(tiny_checkpoint_factory(), model_dir)
    tokenizer.save_pretrained(model_dir)
    return PromptBuilder(load_spec(model_dir)), _load(model_dir)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_encode_equals_transformers_call(builders, prompt):
    builder, reference = builders
    assert rust_backend(builder.tokenizer, ENCODE_METHODS) is not None
    assert builder.encode(prompt) == reference(prompt)["input_ids"]


@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_chat_templated_encode_equals_transformers_call(builders, num_images):
    builder, reference = builders
    for prompt in PROMPTS:
        text = builder.render(prompt, num_images, raw=False)
        assert builder.encode(text) == reference(text)["input_ids"]


def test_random_text_encodes_like_transformers(builders):
    builder, reference = builders
    rng = random.Random(3)
    for _ in range(300):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 20)))
        assert builder.encode(text) == reference(text)["input_ids"], text


def _reference_build(builder, reference, prompt, num_images, raw, per_image):
    ids = reference(builder.render(prompt, num_images, raw))["input_ids"]
    expanded = []
    for token in ids:
        expanded.extend([token] * per_image if token == builder.image_token_id else [token])
    return expanded


@pytest.mark.parametrize("num_images,raw,prompt", [
    (0, False, "plain"), (2, False, "Describe, please ✨"), (3, False, "🙂 " * 10),
    (2, True, "USER: <image>\nfirst <image> second\nASSISTANT:"), (1, True, "<image>"), (2, True, "<image><image>"),
])
@pytest.mark.parametrize("per_image", [None, 1, 3])
def test_build_expands_like_transformers_ids(tiny_checkpoint, num_images, raw, prompt, per_image):
    builder, reference = PromptBuilder(load_spec(tiny_checkpoint)), _load(tiny_checkpoint)
    built = builder.build(prompt, num_images, raw, per_image)
    expected = _reference_build(builder, reference, prompt, num_images, raw, per_image or builder.tokens_per_image)
    assert built.token_ids == expected
    assert built.image_tokens == num_images * (per_image or builder.tokens_per_image)


def test_backend_settings_transformers_would_change_fall_back(tiny_checkpoint):
    builder, reference = PromptBuilder(load_spec(tiny_checkpoint)), _load(tiny_checkpoint)
    text = "x <image> <s> y " * 20
    builder.tokenizer.backend_tokenizer.enable_truncation(max_length=4)
    builder.tokenizer.backend_tokenizer.enable_padding(length=500)
    assert builder.encode(text) == reference(text)["input_ids"]
    builder.tokenizer.split_special_tokens = reference.split_special_tokens = True
    assert builder.encode(text) == reference(text)["input_ids"]
    assert builder.tokenizer.convert_tokens_to_ids("<image>") not in builder.encode(text)


def test_too_long_for_the_model_still_warns(tiny_checkpoint, caplog):
    builder, reference = PromptBuilder(load_spec(tiny_checkpoint)), _load(tiny_checkpoint)
    builder.tokenizer.model_max_length = reference.model_max_length = 8
    with caplog.at_level(logging.WARNING, logger="transformers"):
        assert builder.encode("far more than eight tokens here") == reference("far more than eight tokens here")[
            "input_ids"]
    assert builder.tokenizer.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")


def test_overridden_transformers_methods_keep_the_transformers_path(tiny_checkpoint):
    from transformers import PreTrainedTokenizerFast

    class Shouting(PreTrainedTokenizerFast):
        def _decode(self, *args, **kwargs):
            return super()._decode(*args, **kwargs).upper()

        def _encode_plus(self, *args, **kwargs):
            encoding = super()._encode_plus(*args, **kwargs)
            encoding["input_ids"] = encoding["input_ids"][::-1]
            return encoding

    tok = Shouting(tokenizer_object=_load(tiny_checkpoint).backend_tokenizer)
    assert rust_backend(tok, DECODE_METHODS) is None and rust_backend(tok, ENCODE_METHODS) is None
    ids = tok("quiet harbour", add_special_tokens=False)["input_ids"]
    assert "".join(_stream(tok, [], ids[::-1])) == "QUIET HARBOUR"


def test_instance_level_override_keeps_the_transformers_path(tiny_checkpoint):
    tok = _load(tiny_checkpoint)
    tok.decode = lambda ids, **kwargs: "patched"
    assert rust_backend(tok, DECODE_METHODS) is None
    assert text_decoder(tok)([1, 2]) == "patched"


def _transformers_calls(action) -> set[str]:
    """Names of the transformers functions `action()` runs, but for the `backend_tokenizer` accessor."""
    called: set[str] = set()

    def profile(frame, event, arg):
        if event == "call" and "transformers" in frame.f_code.co_filename:
            called.add(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
    return called - {"backend_tokenizer"}


def test_fast_paths_bypass_the_transformers_wrappers(tiny_checkpoint):
    builder = PromptBuilder(load_spec(tiny_checkpoint))
    detok = IncrementalDetokenizer(builder.tokenizer, [builder.tokenizer.bos_token_id])
    pieces: list[str] = []
    assert _transformers_calls(lambda: pieces.extend(detok.push(t) for t in builder.encode("quiet harbour"))) == set()
    assert "".join(pieces + [detok.flush()]) == "quiet harbour"
