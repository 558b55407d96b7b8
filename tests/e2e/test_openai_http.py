"""The router's OpenAI-compatible HTTP front door, end to end: real service processes, a real
redis-server, plain HTTP on loopback. Answers equal the gRPC API's for the same request; errors
come in OpenAI's shape naming the field; a client that disconnects leaves nothing running."""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.sdk import Client
from epdserve.v1 import common_pb2, decode_pb2_grpc

pytestmark = pytest.mark.e2e

MODEL = "tiny-llava"
MAX_IMAGE_BYTES = 100_000
ARGS = dict(max_tokens=12, temperature=0.0, ignore_eos=True)


def _png(seed: int, size=(48, 40)) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class _Images(http.server.BaseHTTPRequestHandler):
    """A local image host for the allowlist tests: /cat.png, and /big.png (over max_image_bytes)."""

    bodies = {"/cat.png": _png(7), "/big.png": b"\x89PNG" + bytes(MAX_IMAGE_BYTES + 10)}

    def do_GET(self):  # noqa: N802 - http.server's name
        body = self.bodies.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    router = ("--http-port", "0", "--served-model-name", MODEL, "--image-url-allowlist", "127.0.0.1",
              "--max-image-bytes", str(MAX_IMAGE_BYTES))
    cluster = LocalCluster(ClusterConfig(model_dir=tiny_checkpoint, device="cpu", stage_args={"router": router}))
    cluster.start()
    yield cluster
    assert cluster.stop()["router"] == 0   # the HTTP server drains and stops with the gRPC server


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout_s=60) as client:
        yield client


def _connect(cluster) -> http.client.HTTPConnection:
    host, port = cluster.router_http_address.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=60)


def _request(cluster, method: str, path: str, body=None) -> tuple[int, dict, http.client.HTTPResponse]:
    conn = _connect(cluster)
    payload = body if isinstance(body, (bytes, type(None))) else json.dumps(body)
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, (json.loads(data) if data else {}), response


def _chat(cluster, messages, **fields) -> tuple[int, dict]:
    status, body, _ = _request(cluster, "POST", "/v1/chat/completions", {"messages": messages, **fields})
    return status, body


def _user(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _events(response: http.client.HTTPResponse):
    """The SSE `data:` payloads of a streamed response, as they arrive."""
    for line in response:
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            yield line[len("data: "):]


def _assert_same_as_grpc(body: dict, grpc_result) -> None:
    assert body["choices"][0]["message"] == {"role": "assistant", "content": grpc_result.text}
    assert body["choices"][0]["finish_reason"] == grpc_result.finish_reason
    usage = grpc_result.usage
    assert body["usage"] == {
        "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"image_tokens": usage.image_tokens}}


def test_chat_completion_equals_grpc_generate(cluster, client):
    status, body = _chat(cluster, _user("Describe a quiet harbour at dawn."), model=MODEL, **ARGS)
    assert status == 200, body
    _assert_same_as_grpc(body, client.generate("Describe a quiet harbour at dawn.", **ARGS))
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)


def test_stream_concatenates_to_the_same_text_and_ends_with_done(cluster, client):
    conn = _connect(cluster)
    body = {"messages": _user("Tell me a story."), "stream": True, "stream_options": {"include_usage": True}, **ARGS}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    payloads = list(_events(response))
    conn.close()
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    expected = client.generate("Tell me a story.", **ARGS)
    assert text == expected.text
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert chunks[-1]["usage"]["prompt_tokens"] == expected.usage.prompt_tokens


def test_image_as_data_url_counts_image_tokens_like_grpc(cluster, client):
    image = _png(1)
    status, body = _chat(cluster, _user("What is in this picture?", _data_url(image)), **ARGS)
    assert status == 200, body
    expected = client.generate("What is in this picture?", images=[image], **ARGS)
    assert expected.usage.image_tokens == 16
    _assert_same_as_grpc(body, expected)


def test_multi_turn_conversation_keeps_every_message(cluster, client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                *_user("What is it?", _data_url(_png(2)))]
    status, body = _chat(cluster, messages, **ARGS)
    assert status == 200, body
    rendered = "SYSTEM: Be brief.\nUSER: Hi\nASSISTANT: Hello!\nUSER: <image>\nWhat is it?\nASSISTANT:"
    _assert_same_as_grpc(body, client.generate(rendered, images=[_png(2)], raw=True, **ARGS))


def test_remote_image_urls_need_the_allowlist(cluster, client, image_host):
    status, body = _chat(cluster, _user("cat?", f"{image_host}/cat.png"), **ARGS)
    assert status == 200, body
    _assert_same_as_grpc(body, client.generate("cat?", images=[_png(7)], **ARGS))
    status, body = _chat(cluster, _user("cat?", "http://localhost:9/cat.png"), **ARGS)
    assert status == 400 and body["error"]["param"] == "messages[0].content[0].image_url.url"
    assert "not allowed for host 'localhost'" in body["error"]["message"]
    status, body = _chat(cluster, _user("big?", f"{image_host}/big.png"), **ARGS)
    assert status == 429 and "max_image_bytes" in body["error"]["message"]
    assert body["error"]["param"] == "messages[0].content[0].image_url.url"


@pytest.mark.parametrize("body,status,param,message", [
    (b"{not json", 400, None, "request body: not valid JSON"),
    ({"messages": _user("x"), "n": 2}, 400, "n", "only n=1"),
    ({"messages": _user("x"), "max_tokens": 5000}, 400, "max_tokens", "exceeds the model's context length (2048)"),
    ({"messages": _user("x"), "max_completion_tokens": 0}, 400, "max_completion_tokens", "must be >= 1"),
    ({"messages": _user("x"), "temperature": "hot"}, 400, "temperature", "must be a number"),
    ({"messages": _user("x"), "top_p": 1.5}, 400, "top_p", "top_p must be in (0, 1]"),
    ({"messages": _user("x"), "stop": [""]}, 400, "stop", "stop[0]: stop strings must not be empty"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "must be one of"),
    ({"messages": _user("x", _data_url(b"not an image"))}, 400, "messages[0].content[0].image_url.url",
     "not a decodable image"),
    ({"messages": _user("x"), "model": "gpt-4o"}, 404, "model", "is not served here"),
    ({"messages": _user("x"), "frobnicate": 1}, 400, "frobnicate", "unrecognized request argument"),
])
def test_bad_requests_get_openai_errors_naming_the_field(cluster, body, status, param, message):
    got, payload, _ = _request(cluster, "POST", "/v1/chat/completions", body)
    assert got == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == ("invalid_request_error" if status in (400, 404) else error["type"])


def test_models_and_health(cluster):
    status, body, _ = _request(cluster, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in body["data"]] == [(MODEL, "model", 2048)]
    assert _request(cluster, "GET", "/health")[0] == 200
    status, body, _ = _request(cluster, "GET", "/v1/nothing-here")
    assert status == 404 and "error" in body


def _stream_until(cluster, request_id: str, chunks: int):
    """Start a long streamed chat and read until `chunks` content chunks arrived; returns the open
    connection and response."""
    conn = _connect(cluster)
    body = {"messages": _user("a long answer"), "stream": True, "request_id": request_id, "max_tokens": 2000,
            "temperature": 0.0, "ignore_eos": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
    response = conn.getresponse()
    assert response.status == 200
    events = _events(response)
    seen = 0
    while seen < chunks:
        seen += "content" in json.loads(next(events))["choices"][0]["delta"]
    return conn, response, events


def test_grpc_abort_stops_an_http_request(cluster, client):
    conn, response, events = _stream_until(cluster, "http-abort", 2)
    assert client.abort("http-abort") is True
    rest = list(events)
    conn.close()
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["choices"][0]["finish_reason"] == "abort"


def test_client_disconnect_mid_stream_cancels_the_generation(cluster):
    conn, response, _ = _stream_until(cluster, "http-gone", 3)
    status, body = _chat(cluster, _user("same id"), request_id="http-gone", max_tokens=1)
    assert status == 409 and "already running" in body["error"]["message"]   # the router holds it
    response.close()
    conn.close()
    gone = time.monotonic()
    while True:  # the same id is free again once the router has dropped the request
        status, body = _chat(cluster, _user("same id"), request_id="http-gone", max_tokens=1)
        if status == 200:
            break
        assert status == 409 and time.monotonic() - gone < 4.0, "the request outlived its client"
        time.sleep(0.05)
    with grpc.insecure_channel(cluster.children["decode"].address) as channel:  # and decode holds nothing
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        assert stub.Abort(common_pb2.AbortRequest(request_id="http-gone"), timeout=5).found is False
