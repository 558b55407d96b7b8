"""Bounded fuzzing (hypothesis) of what parses untrusted input: the router's request validation
(`services/router/requests.py`, from a built message and from arbitrary wire bytes), the OpenAI
JSON -> request conversion (`openai_protocol.parse_json` / `parse_chat` / `generate_request`, then
the router's validation), and the mmcache header parsers (data-channel header, index entry).
Every input either parses or raises the project's typed errors (`epdserve.errors.EpdserveError`;
`CorruptEntryError` for cache headers), never anything else. Bounded by max_examples and
deadline: the whole file runs in a few seconds on 2 cores."""

from __future__ import annotations

import json

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epdserve.config import RouterConfig
from epdserve.errors import EpdserveError
from epdserve.v1 import common_pb2, router_pb2
from mmcache.codec import CorruptEntryError, parse_header
from mmcache.index import IndexEntry
from services.router.openai_protocol import generate_request, parse_chat, parse_json
from services.router.requests import parse_request

pytestmark = pytest.mark.unit
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CONFIG = RouterConfig(encode=("e:1",), prefill=("p:1",), decode=("d:1",), max_prompt_bytes=4096, max_image_bytes=64,
                      max_images_per_request=3, max_stop_strings=4, max_stop_string_chars=8)

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # protobuf strings are valid Unicode
floats32 = st.floats(width=32)
int32 = st.integers(-(1 << 31), (1 << 31) - 1)


def _must_parse_or_refuse(parse, *args):
    try:
        return parse(*args)
    except EpdserveError as exc:
        assert exc.code != "INTERNAL" and exc.message, exc
        return None


@st.composite
def generate_requests(draw) -> router_pb2.GenerateRequest:
    params = router_pb2.GenerationParams()
    if draw(st.booleans()):
        params.max_tokens = draw(int32)
    for field, values in (("temperature", floats32), ("top_p", floats32), ("top_k", int32),
                          ("seed", st.integers(0, (1 << 64) - 1))):
        if draw(st.booleans()):
            setattr(params.sampling, field, draw(values))
    params.stop.extend(draw(st.lists(text, max_size=6)))
    params.ignore_eos = draw(st.booleans())
    if draw(st.booleans()):
        params.image_keep_ratio = draw(floats32)
    if draw(st.booleans()):
        params.fastkv.CopyFrom(common_pb2.FastKVSettings(
            enabled=draw(st.booleans()), tsp_rate=draw(floats32), retain_rate=draw(floats32),
            tsp_length=draw(int32), kv_budget=draw(int32)))
    return router_pb2.GenerateRequest(
        request_id=draw(st.one_of(st.just(""), text, st.from_regex(r"[A-Za-z0-9._:-]{1,130}", fullmatch=True))),
        prompt=draw(st.one_of(text, st.builds(lambda n, c: c * n, st.integers(0, 5000),
                                              st.sampled_from(["a", " ", "\u00e9", "\U0001F642", "<image>"])))),
        images=[common_pb2.ImageInput(data=d) for d in draw(st.lists(st.binary(max_size=80), max_size=4))],
        params=params, raw=draw(st.booleans()))


@FUZZ
@given(generate_requests())
def test_router_validation_parses_or_refuses_with_a_typed_error(msg):
    parsed = _must_parse_or_refuse(parse_request, msg, CONFIG)
    if parsed is not None:  # what passed holds the limits
        assert 1 <= parsed.max_tokens and len(parsed.stop) <= CONFIG.max_stop_strings
        assert len(parsed.images) <= CONFIG.max_images_per_request
        assert parsed.sampling.temperature >= 0 and 0 < parsed.sampling.top_p <= 1


@FUZZ
@given(st.binary(max_size=300))
def test_router_validation_of_arbitrary_wire_bytes(data):
    try:
        msg = router_pb2.GenerateRequest.FromString(data)
    except DecodeError:
        return  # grpc answers this itself, before any handler runs
    _must_parse_or_refuse(parse_request, msg, CONFIG)


# JSON strings may carry lone surrogates ("\ud800" escapes; st.text would drop them from its alphabet)
json_text = st.lists(st.one_of(st.characters(), st.sampled_from("\ud800\udfff\ud83d")), max_size=20).map("".join)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.sampled_from([10**400]),
                         st.floats(allow_nan=False, allow_infinity=False), json_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(json_text, inner, max_size=4)), max_leaves=12)
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
          "stream", "stream_options", "n", "top_k", "ignore_eos", "image_keep_ratio", "fastkv", "request_id",
          "logit_bias", "tools", "response_format", "user"]
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(json_text, json_values)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
        st.fixed_dictionaries({"url": st.one_of(
            st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,!!", "data:,x",
                             "http://169.254.169.254/latest", "file:///etc/passwd", "http://[::1", "https://h\x00/"]),
            st.text(max_size=30))}),
        json_values)}),
    json_values)
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", ""]),
                           "content": st.one_of(json_text, st.lists(parts, max_size=3), json_values)}),
    json_values), max_size=3)
near_valid = st.builds(  # one user message and a few sampling fields: most of these reach generate_request
    lambda content, extra: {"messages": [{"role": "user", "content": content}], **extra},
    st.one_of(json_text, st.lists(parts, min_size=1, max_size=2)),
    st.dictionaries(st.sampled_from(["stop", "temperature", "top_p", "top_k", "seed", "max_tokens", "request_id"]),
                    st.one_of(json_scalars, st.lists(json_text, max_size=3)), max_size=3))
bodies = st.one_of(
    near_valid,
    json_values,
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5),
    st.builds(lambda m, extra: {"messages": m, **extra}, messages,
              st.dictionaries(st.sampled_from(FIELDS[2:]), json_values, max_size=4)))


def _chat_to_router_request(raw: bytes):
    chat = parse_chat(parse_json(raw), model="tiny", max_image_bytes=64, allowlist=("images.example",))
    prompt = "\n".join(p.get("text", "<image>") for m in chat.messages for p in m["content"])
    msg = generate_request(chat, prompt or "x", [s.data or b"remote" for s in chat.images])
    return parse_request(router_pb2.GenerateRequest.FromString(msg.SerializeToString()), CONFIG)


@FUZZ
@given(bodies)
def test_openai_json_to_request_parses_or_refuses_with_a_typed_error(body):
    _must_parse_or_refuse(_chat_to_router_request, json.dumps(body).encode())


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.builds(
    lambda b, junk: json.dumps(b).encode()[: len(junk)] + junk, bodies, st.binary(max_size=30))))
def test_openai_raw_bytes_parse_or_refuse_with_a_typed_error(raw):
    _must_parse_or_refuse(_chat_to_router_request, raw)


@pytest.mark.parametrize("raw,field", [
    (b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}', "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\udfff"]}', "stop[0]"),
    (b'{"messages": [{"role": "user", "content": "x"}], "request_id": "\\ud83d"}', "request_id"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1' + b"0" * 400 + b"}", "temperature"),
])
def test_fuzz_findings_are_invalid_argument_naming_the_field(raw, field):
    """Two gaps the fuzzers above reach (they generate both): a lone surrogate escape reached
    protobuf (ValueError, HTTP 500) and an integer past the float range reached float()
    (OverflowError, HTTP 500)."""
    with pytest.raises(EpdserveError) as info:
        _chat_to_router_request(raw)
    assert info.value.code == "INVALID_ARGUMENT" and info.value.message.startswith(field), info.value.message
    ok = b'{"messages": [{"role": "user", "content": "emoji \\ud83d\\ude00 pair"}]}'  # a valid pair is fine
    assert "\U0001F600" in _chat_to_router_request(ok).prompt


header_values = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(["float32", "bfloat16", "uint8", "int64", "object", ""]), json_values),
    "shape": st.one_of(st.lists(st.integers(-3, 1 << 62), max_size=10), json_values),
    "nbytes": st.one_of(st.integers(-(1 << 64), 1 << 64), json_values),
    "checksum": st.one_of(st.text(max_size=10), json_values)})


@FUZZ
@given(st.one_of(st.binary(max_size=200), header_values.map(lambda h: json.dumps(h).encode())))
def test_cache_header_parses_or_is_corrupt(raw):
    try:
        header = parse_header(raw)
    except CorruptEntryError:
        return
    assert header["nbytes"] >= 0 and all(d >= 0 for d in header["shape"])


@FUZZ
@given(st.one_of(st.binary(max_size=200), json_values.map(json.dumps), st.builds(
    lambda h, extra: json.dumps({**h, **extra}),
    st.fixed_dictionaries({"o": st.just("o"), "h": st.just("h"), "c": st.just(""), "x": st.just(""),
                           "t": st.just("host"), "p": st.just(""), "f": st.just(0), "a": st.just(0.0)}),
    st.fixed_dictionaries({}, optional={"d": json_values, "s": json_values, "n": json_values, "k": json_values,
                                        "f": json_values}))))
def test_index_entry_parses_or_is_corrupt(text):
    try:
        IndexEntry.from_json("img:k", text)
    except CorruptEntryError:
        pass
