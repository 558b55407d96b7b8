"""OpenAI chat JSON -> GenerateRequest, events -> OpenAI JSON / SSE, typed errors -> HTTP status
and OpenAI's error shape (pure conversion; the HTTP server itself is in tests/e2e)."""

from __future__ import annotations

import base64
import json

import pytest

from epdserve.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from epdserve.transport.errors import INTERNAL_MESSAGE
from services.router.openai_protocol import (
    ChunkStream,
    completion,
    error_body,
    generate_request,
    parse_chat,
    parse_json,
)
from services.router.orchestrator import Finished, TextChunk
from services.router.server import Failed

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\nfake"


def _parse(body, **kwargs):
    return parse_chat(body, **{"model": "m", "max_image_bytes": 1000, **kwargs})


def _user(*parts):
    return {"messages": [{"role": "user", "content": list(parts)}]}


def _image(url):
    return {"type": "image_url", "image_url": {"url": url}}


DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def test_full_request_maps_to_generation_params():
    chat = _parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7,
                   "temperature": 0, "top_p": 0.5, "seed": 3, "stop": "END", "top_k": 4, "ignore_eos": True,
                   "image_keep_ratio": 0.25, "fastkv": {"tsp_rate": 0.3}, "n": 1, "user": "u", "logprobs": False,
                   "request_id": "abc", "stream": True, "stream_options": {"include_usage": True}})
    request = generate_request(chat, "PROMPT", [])
    p = request.params
    assert request.request_id == "abc" and request.raw and request.prompt == "PROMPT"
    assert (p.max_tokens, p.sampling.temperature, p.sampling.top_p, p.sampling.seed, p.sampling.top_k) == \
        (7, 0.0, 0.5, 3, 4)
    assert p.sampling.HasField("temperature") and list(p.stop) == ["END"] and p.ignore_eos
    assert p.image_keep_ratio == 0.25 and p.fastkv.enabled and p.fastkv.tsp_rate == pytest.approx(0.3)
    assert chat.stream and chat.include_usage


def test_unset_fields_stay_unset_so_router_defaults_apply():
    chat = _parse({"messages": [{"role": "user", "content": "hi"}]})
    p = chat.params
    assert not p.HasField("max_tokens") and not p.sampling.HasField("temperature")
    assert not p.sampling.HasField("seed") and not p.HasField("image_keep_ratio") and not p.HasField("fastkv")
    assert chat.request_id.startswith("chatcmpl-") and not chat.stream and not chat.include_usage


def test_max_completion_tokens_is_named_in_errors():
    chat = _parse({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9})
    assert chat.params.max_tokens == 9
    status, body, _ = error_body(InvalidArgumentError("params.max_tokens: must be >= 1 (got 0)"), chat.field_names)
    assert status == 400 and body["error"]["param"] == "max_completion_tokens"
    assert body["error"]["message"] == "max_completion_tokens: must be >= 1 (got 0)"


def test_messages_keep_order_roles_and_image_slots():
    chat = _parse({"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [_image(DATA_URL), {"type": "text", "text": "a"}, _image(DATA_URL)]},
        {"role": "assistant", "content": "b"},
    ]})
    assert chat.messages == [
        {"role": "system", "content": [{"type": "text", "text": "sys"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "b"}]},
    ]
    assert [i.data for i in chat.images] == [PNG, PNG]
    assert chat.field_names["images[1]"] == "messages[1].content[2].image_url.url"
    request = generate_request(chat, "P", [i.data for i in chat.images])
    assert [i.data for i in request.images] == [PNG, PNG]


@pytest.mark.parametrize("body,field,error", [
    ([], "request body", InvalidArgumentError),
    ({"messages": []}, "messages", InvalidArgumentError),
    ({"messages": "hi"}, "messages", InvalidArgumentError),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", InvalidArgumentError),
    ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "messages[0].name", InvalidArgumentError),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", InvalidArgumentError),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type",
     InvalidArgumentError),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text",
     InvalidArgumentError),
    ({"messages": [{"role": "system", "content": [_image(DATA_URL)]}]}, "messages[0].content[0]",
     InvalidArgumentError),
    ({"messages": [{"role": "user", "content": "a <image> b"}]}, "messages[0].content", InvalidArgumentError),
    ({**_user(_image("data:image/png,raw")), }, "messages[0].content[0].image_url.url", InvalidArgumentError),
    ({**_user(_image("data:image/png;base64,@@@@")), }, "messages[0].content[0].image_url.url",
     InvalidArgumentError),
    ({**_user(_image("data:image/png;base64," + "A" * 4000)), }, "messages[0].content[0].image_url.url",
     ResourceExhaustedError),
    ({**_user(_image("file:///etc/passwd")), }, "messages[0].content[0].image_url.url", InvalidArgumentError),
    ({**_user(_image("https://evil.example/x.png")), }, "messages[0].content[0].image_url.url",
     InvalidArgumentError),
    ({**_user(_image("https://ok.example@evil.example/x.png")), }, "messages[0].content[0].image_url.url",
     InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "n": 2}, "n", InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "n": True}, "n", InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "max_tokens": "5"}, "max_tokens", InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "max_tokens": 1 << 40}, "max_tokens", InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "max_tokens": 5, "max_completion_tokens": 6},
     "max_completion_tokens", InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "temperature": True}, "temperature", InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "seed": -1}, "seed", InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "stop": [1]}, "stop", InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "stream_options": {"include_usage": True}}, "stream_options",
     InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "logprobs": True}, "logprobs", InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "tools": [{"type": "function"}]}, "tools", InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "fastkv": {"tsp": 1}}, "fastkv.tsp", InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "best_of": 2}, "best_of", InvalidArgumentError),
    ({**_user({"type": "text", "text": "x"}), "model": "other"}, "model", NotFoundError),
])
def test_bad_bodies_name_the_field(body, field, error):
    with pytest.raises(error) as info:
        _parse(body, allowlist=("ok.example",))
    assert info.value.message.startswith(f"{field}:"), info.value.message
    status, payload, _ = error_body(info.value, {})
    assert payload["error"]["param"] == (None if field == "request body" else field)
    assert status == (404 if error is NotFoundError else 429 if error is ResourceExhaustedError else 400)


def test_allowlisted_remote_url_is_kept_for_fetching():
    chat = _parse(_user(_image("https://OK.example/cat.png")), allowlist=("ok.example",))
    assert chat.images[0].url == "https://ok.example/cat.png" and chat.images[0].data == b""


def test_json_parsing_rejects_garbage_and_nan():
    assert parse_json(b'{"a": 1}') == {"a": 1}
    for raw in (b"{", b'{"temperature": NaN}', b"\xff"):
        with pytest.raises(InvalidArgumentError, match="request body: not valid JSON"):
            parse_json(raw)


@pytest.mark.parametrize("error,status,kind", [
    (InvalidArgumentError("x"), 400, "invalid_request_error"),
    (NotFoundError("x"), 404, "invalid_request_error"),
    (AlreadyExistsError("x"), 409, "invalid_request_error"),
    (ResourceExhaustedError("x"), 429, "rate_limit_error"),
    (UnavailableError("x"), 503, "service_unavailable"),
    (DeadlineExceededError("x"), 504, "timeout"),
    (UnauthenticatedError("x"), 401, "authentication_error"),
    (InternalError("secret stack detail"), 500, "server_error"),
    (FailedPreconditionError("kv:abc vanished"), 500, "server_error"),
])
def test_status_mapping(error, status, kind):
    got, body, headers = error_body(error, {})
    assert (got, body["error"]["type"], body["error"]["code"]) == (status, kind, error.code.lower())
    assert headers == {}
    if status == 500:
        assert body["error"]["message"] == INTERNAL_MESSAGE and body["error"]["param"] is None


def test_retry_after_header_from_the_error_hint():
    assert error_body(ResourceExhaustedError("busy", retry_after_s=1.2), {})[2] == {"Retry-After": "2"}
    assert error_body(UnavailableError("draining", retry_after_s=0.0), {})[2] == {"Retry-After": "0"}
    assert error_body(InvalidArgumentError("x", retry_after_s=3.0), {})[2] == {}


def test_router_field_names_are_translated():
    names = {"images[0]": "messages[2].content[1].image_url.url", "params.max_tokens": "max_tokens"}
    cases = {
        "params.sampling.temperature must be a finite number >= 0 (got -1.0)": "temperature",
        "params.stop[1]: stop strings must not be empty": "stop",
        "images[0]: not a decodable image": "messages[2].content[1].image_url.url",
        "prompt: 2000000 bytes exceeds max_prompt_bytes (1048576)": "messages",
        "prompt (12 tokens, of which 0 image tokens) + params.max_tokens (5000) = 5012 exceeds": "max_tokens",
        "params.image_keep_ratio must be in (0, 1] (got 2.0)": "image_keep_ratio",
        "request_id 'a' is already running": "request_id",
    }
    for message, param in cases.items():
        status, body, _ = error_body(InvalidArgumentError(message), names)
        assert body["error"]["param"] == param, message
        assert "params." not in body["error"]["message"] and "images[" not in body["error"]["message"]


def _finished(reason="length"):
    return Finished(reason, prompt_tokens=20, image_tokens=16, completion_tokens=3, timings_ms={})


def test_completion_shape():
    chat = _parse({"messages": [{"role": "user", "content": "hi"}], "request_id": "r1"})
    body = completion(chat, 123, "abc", _finished())
    assert body == {
        "id": "r1", "object": "chat.completion", "created": 123, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "abc"}, "logprobs": None,
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23,
                  "prompt_tokens_details": {"image_tokens": 16}},
    }


def _data(payloads):
    return [p.decode() for p in payloads]


def test_stream_chunks_with_usage():
    chat = _parse({"messages": [{"role": "user", "content": "hi"}], "request_id": "r1", "stream": True,
                   "stream_options": {"include_usage": True}})
    stream = ChunkStream(chat, 5)
    first = json.loads(stream.first().decode()[len("data: "):])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    assert stream.payloads(TextChunk("", (1,))) == []   # an incomplete code point: nothing to send yet
    text = json.loads(stream.payloads(TextChunk("ab", (1, 2)))[0].decode()[6:])
    assert text["object"] == "chat.completion.chunk" and text["choices"][0]["delta"] == {"content": "ab"}
    end = _data(stream.payloads(_finished("stop")))
    assert json.loads(end[0][6:])["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                    "finish_reason": "stop"}
    assert json.loads(end[1][6:])["choices"] == [] and json.loads(end[1][6:])["usage"]["total_tokens"] == 23
    assert end[2] == "data: [DONE]\n\n" and all(p.endswith("\n\n") for p in end)


def test_stream_without_usage_and_error_after_first_chunk():
    chat = _parse({"messages": [{"role": "user", "content": "hi"}], "stream": True})
    stream = ChunkStream(chat, 5)
    assert "usage" not in json.loads(stream.first().decode()[6:])
    assert len(stream.payloads(_finished())) == 2    # finish chunk, [DONE]
    failed = _data(stream.payloads(Failed(UnavailableError("decode stage unavailable: gone"))))
    assert json.loads(failed[0][6:])["error"]["code"] == "unavailable" and failed[1] == "data: [DONE]\n\n"
    hidden = json.loads(_data(stream.payloads(Failed(InternalError("boom"))))[0][6:])
    assert hidden["error"]["message"] == INTERNAL_MESSAGE
