"""Bad input through the real services (RELIABILITY.md §3 rows not covered elsewhere): sampling
values at and past their limits, huge stop lists, a prompt over the context, placeholder / image
count mismatches with raw=True, odd Unicode streamed without splitting a code point, and crafted
image embeddings sent straight to prefill. Each refusal has the right status and a message naming
the field and the limit, and no message leaks a file path, shared-memory name or internal address.
One LocalCluster of the tiny model for the module."""

from __future__ import annotations

import io
import math
import re
import uuid

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from epdserve.config import CacheConfig
from epdserve.errors import EpdserveError, InvalidArgumentError
from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.models.spec import load_spec
from epdserve.sdk import Client
from epdserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from mmcache.client import CacheIdentity, SyncMMCache

pytestmark = pytest.mark.e2e
LEAK = re.compile(r"/(dev|tmp|home|etc|proc|var|run|work)/|\.shm\b|pool-|disk-|epdserve-cluster|"
                  r"\b\d{1,3}(\.\d{1,3}){3}\b|localhost|\[::1?\]|:\d{4,5}\b|Traceback|File \"")


def _assert_no_leak(message: str) -> None:
    assert not LEAK.search(message), f"error message leaks internals: {message!r}"


def _png(seed: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    with LocalCluster(ClusterConfig(model_dir=tiny_checkpoint, device="cpu")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout_s=120) as client:
        yield client


def _refused(client, error, pattern: str, prompt: str = "Describe the image", **kwargs) -> EpdserveError:
    with pytest.raises(error, match=pattern) as info:
        client.generate(prompt, **{"max_tokens": 4, **kwargs})
    _assert_no_leak(info.value.message)
    return info.value


F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(temperature=math.nan), r"params\.sampling\.temperature must be a finite number >= 0 \(got nan\)"),
    (dict(temperature=math.inf), r"params\.sampling\.temperature must be a finite number >= 0 \(got inf\)"),
    (dict(temperature=-math.inf), r"params\.sampling\.temperature must be a finite number >= 0"),
    (dict(temperature=-1e-30), r"params\.sampling\.temperature must be a finite number >= 0"),
    (dict(top_p=math.nan), r"params\.sampling\.top_p must be in \(0, 1\] \(got nan\)"),
    (dict(top_p=math.inf), r"params\.sampling\.top_p must be in \(0, 1\]"),
    (dict(top_p=-0.5), r"params\.sampling\.top_p must be in \(0, 1\]"),
    (dict(top_k=-2), r"params\.sampling\.top_k must be -1 or 0 \(disabled\) or a positive integer \(got -2\)"),
    (dict(top_k=-(1 << 31)), r"params\.sampling\.top_k .*\(got -2147483648\)"),
    (dict(max_tokens=-1), r"params\.max_tokens: must be >= 1 \(got -1\)"),
    (dict(max_tokens=(1 << 31) - 1), r"params\.max_tokens \(2147483647\) = \d+ exceeds the model's context "
                                     r"length \(2048\)"),
    (dict(stop=["s"] * 17), r"params\.stop: 17 stop strings exceeds the limit \(16\)"),
    (dict(stop=["s"] * 10_000), r"params\.stop: 10000 stop strings exceeds the limit \(16\)"),
    (dict(stop=["ok", "x" * 257]), r"params\.stop\[1\]: 257 characters exceeds the limit \(256\)"),
    (dict(stop=["x" * 100_000]), r"params\.stop\[0\]: 100000 characters exceeds the limit \(256\)"),
])
def test_sampling_and_stop_values_past_their_limits_are_refused(client, kwargs, pattern):
    _refused(client, InvalidArgumentError, pattern, **kwargs)


def test_extreme_but_valid_sampling_values_generate(client):
    """A denormal temperature samples greedily (logits / 1e-40 overflows float32 to inf: it used to
    crash the sampler with NaN probabilities), the largest float32 temperature is near uniform,
    and a top_k past the vocabulary is no restriction."""
    greedy = client.generate("x", max_tokens=4, temperature=0.0, ignore_eos=True).token_ids
    assert client.generate("x", max_tokens=4, temperature=1e-40, ignore_eos=True).token_ids == greedy
    assert client.generate("x", max_tokens=4, temperature=1e-6, seed=3, ignore_eos=True).token_ids == greedy
    for kwargs in (dict(temperature=F32_MAX), dict(top_k=(1 << 31) - 1), dict(top_p=1e-30)):
        assert client.generate("x", max_tokens=3, seed=1, ignore_eos=True, **kwargs).usage.completion_tokens == 3


def test_prompt_over_the_context_is_refused_with_both_numbers(client):
    error = _refused(client, InvalidArgumentError, r"prompt \((\d+) tokens, of which 0 image tokens\) \+ "
                     r"params\.max_tokens \(1\) = \d+ exceeds the model's context length \(2048\)",
                     prompt="word " * 3000, max_tokens=1)
    assert int(re.search(r"prompt \((\d+) tokens", error.message).group(1)) > 2048


def test_image_tokens_count_toward_the_context(client):
    error = _refused(client, InvalidArgumentError, r"of which 256 image tokens", prompt="word " * 1800,
                     images=[_png(i) for i in range(16)], max_tokens=1)
    assert "exceeds the model's context length (2048)" in error.message


@pytest.mark.parametrize("prompt,images,pattern", [
    ("<image> and <image>", 1, r"prompt: has 2 image placeholder\(s\) '<image>' but 1 image\(s\) were given"),
    ("<image>", 0, r"prompt: has 1 image placeholder\(s\) '<image>' but 0 image\(s\) were given"),
    ("<image><image><image>", 2, r"has 3 image placeholder"),
])
def test_raw_placeholder_and_image_count_mismatch(client, prompt, images, pattern):
    _refused(client, InvalidArgumentError, pattern, prompt=prompt, images=[_png(i) for i in range(images)], raw=True)


ODD = "e\u0301\u0302 a\u0308 \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 \u202e rtl \u202c " \
      "\U0001F469\u200d\U0001F469\u200d\U0001F467 \U0001F44D\U0001F3FD \U0001F1FA\U0001F1F3 \x00 \ufeff \U0010FFFF"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_odd_unicode_streams_without_splitting_a_code_point(client, tiny_checkpoint, seed):
    """Random sampling from the random tiny model emits byte-fallback pieces of multi-byte
    characters: every chunk is whole code points, and the chunks add up to the full decode."""
    from transformers import AutoTokenizer

    stream = client.stream(ODD, max_tokens=40, temperature=1.0, seed=seed, ignore_eos=True)
    chunks = [chunk.text for chunk in stream]
    result = stream.result
    assert result.usage.prompt_tokens > 40 and result.usage.completion_tokens == 40
    for chunk in chunks:
        chunk.encode("utf-8")  # no lone surrogate halves
    assert "".join(chunks) == result.text
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert result.text == tokenizer.decode(list(result.token_ids), skip_special_tokens=True)


# ---- crafted image embeddings straight to prefill (CVE-2025-62372) -----------------------------------


@pytest.fixture(scope="module")
def spec(tiny_checkpoint):
    return load_spec(tiny_checkpoint)


@pytest.fixture(scope="module")
def producer(cluster, tmp_path_factory):
    """An mmcache owner in the test process, publishing into the cluster's index namespace."""
    config = CacheConfig(redis_url=cluster.redis_url, shm_dir=str(tmp_path_factory.mktemp("producer")),
                         capacity_bytes=8 << 20)
    with SyncMMCache(config, CacheIdentity(f"test-{uuid.uuid4().hex[:8]}", "")) as cache:
        yield cache


@pytest.fixture(scope="module")
def prefill(cluster):
    with grpc.insecure_channel(cluster.children["prefill"].address) as channel:
        yield prefill_pb2_grpc.PrefillServiceStub(channel)


def _prefill(prefill, spec, refs, placeholders: int = 16) -> grpc.RpcError:
    tokens = [1, *([spec.image_token_id] * placeholders), 5, 6]
    request = prefill_pb2.PrefillRequest(request_id="crafted", token_ids=tokens, image_embeddings=refs,
                                         sampling=common_pb2.SamplingParams(temperature=0.0))
    with pytest.raises(grpc.RpcError) as info:
        prefill.Prefill(request, timeout=60)
    _assert_no_leak(info.value.details())
    return info.value


def _put(producer, tensor) -> common_pb2.TensorRef:
    return producer.put(f"img:{uuid.uuid4().hex}", tensor, ttl_s=120)


def _ref(ref, **fields) -> common_pb2.TensorRef:
    copy = common_pb2.TensorRef()
    copy.CopyFrom(ref)
    for name, value in fields.items():
        if name == "shape":
            del copy.shape[:]
            copy.shape.extend(value)
        else:
            setattr(copy, name, value)
    return copy


def test_embeddings_with_bad_values_reach_prefill_and_are_refused(prefill, producer, spec):
    hidden = spec.decoder.hidden_size
    nan = torch.randn(16, hidden)
    nan[3, 5] = math.nan
    inf = torch.randn(16, hidden)
    inf[0, 0] = -math.inf
    for tensor, pattern in ((nan, "image_embeddings[0]: contains NaN or Inf"),
                            (inf, "image_embeddings[0]: contains NaN or Inf"),
                            (torch.randn(8, hidden), "token_ids: 16 image placeholder tokens but the image "
                                                     "embeddings have 8 rows")):
        error = _prefill(prefill, spec, [_put(producer, tensor)])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and pattern in error.details(), error.details()


@pytest.mark.parametrize("tensor,fields,pattern", [
    ("wide", {}, "image_embeddings[0]: expected a float [tokens, {H}] tensor (got dtype code"),
    ("ints", {}, "image_embeddings[0]: expected a float [tokens, {H}] tensor"),
    ("good", dict(dtype=99), "image_embeddings[0]: expected a float"),
    ("good", dict(shape=[16, "H", 1]), "image_embeddings[0]: expected a float"),
    ("good", dict(shape=[-16, "H"]), "image_embeddings[0]: -16 rows (must be in [1, 2048])"),
    ("good", dict(shape=[1 << 40, "H"]), "image_embeddings[0]: 1099511627776 rows (must be in [1, 2048])"),
    ("good", dict(nbytes=12), "image_embeddings[0]: nbytes 12 does not match dtype float32 shape (16, {H})"),
])
def test_embedding_refs_with_crafted_headers_are_refused_before_any_read(prefill, producer, spec, tensor, fields,
                                                                        pattern):
    hidden = spec.decoder.hidden_size
    tensors = {"good": torch.randn(16, hidden), "wide": torch.randn(16, hidden + 1),
               "ints": torch.zeros(16, hidden, dtype=torch.int64)}
    if "shape" in fields:
        fields = {**fields, "shape": [hidden if d == "H" else d for d in fields["shape"]]}
    error = _prefill(prefill, spec, [_ref(_put(producer, tensors[tensor]), **fields)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert pattern.replace("{H}", str(hidden)) in error.details(), error.details()


def test_refs_to_foreign_files_or_bytes_are_misses_not_reads(prefill, producer, spec, tmp_path):
    hidden = spec.decoder.hidden_size
    ref = _put(producer, torch.randn(16, hidden))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(16 * hidden * 4))
    for fields in (dict(checksum="xxh3_64:0000000000000000"),         # wrong checksum
                   dict(tier="disk", path=str(secret)),                # a file that is no owner's cache file
                   dict(tier="host", path="/etc/passwd", offset=0)):
        error = _prefill(prefill, spec, [_ref(ref, **fields)])
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == "image_embeddings[0]: entry is no longer in the cache"


def test_prefill_and_the_cluster_keep_serving(client, prefill, producer, spec):
    """After everything above: prefill answers a well-formed crafted request, the router serves."""
    good = _put(producer, torch.randn(16, spec.decoder.hidden_size) * 0.02)
    tokens = [1, *([spec.image_token_id] * 16), 5, 6]
    answer = prefill.Prefill(prefill_pb2.PrefillRequest(
        request_id="good", token_ids=tokens, image_embeddings=[good],
        sampling=common_pb2.SamplingParams(temperature=0.0)), timeout=60)
    assert answer.kv.length == len(tokens)
    producer.release(list(answer.kv.layers))  # decode's part: end the KV hand-off's leases
    assert client.generate("still fine?", images=[_png(9)], max_tokens=2).usage.completion_tokens >= 1


def _send_invalid_utf8(cluster) -> grpc.RpcError:
    prompt = b"bad \xff\xfe utf-8"
    raw = b"\x12" + bytes([len(prompt)]) + prompt  # field 2 (prompt), length-delimited, not UTF-8
    with grpc.insecure_channel(cluster.router_address) as channel:
        generate = channel.unary_stream("/epdserve.v1.RouterService/Generate")  # no serializer: raw bytes
        with pytest.raises(grpc.RpcError) as info:
            list(generate(raw, timeout=30))
    return info.value


def test_invalid_utf8_on_the_wire_is_refused_without_a_leak(cluster, client):
    """A client that bypasses the SDK's check (which raises InvalidArgumentError before sending)
    and sends invalid UTF-8 in a proto string: refused, nothing leaks, the router serves on."""
    error = _send_invalid_utf8(cluster)
    assert error.code() != grpc.StatusCode.OK
    _assert_no_leak(error.details() or "")
    assert client.generate("still fine?", max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.parametrize("service, method", [
    ("router", "RouterService/Generate"), ("router", "RouterService/Abort"),
    ("encode", "EncodeService/Encode"), ("prefill", "PrefillService/Prefill"),
    ("decode", "DecodeService/Decode"), ("decode", "LoadService/GetLoad")])
def test_a_request_that_does_not_parse_is_invalid_argument(cluster, service, method):
    """Bytes no protobuf parser accepts (a truncated field): INVALID_ARGUMENT naming the message, on
    every service, not grpc.aio's UNKNOWN."""
    address = cluster.router_address if service == "router" else cluster.children[service].address
    streams = method.endswith(("/Generate", "/Decode"))
    with grpc.insecure_channel(address) as channel:
        call = (channel.unary_stream if streams else channel.unary_unary)(f"/epdserve.v1.{method}")
        with pytest.raises(grpc.RpcError) as info:  # field 1, length-delimited, 64 bytes promised, 5 sent
            list(call(b"\x0a\x40short", timeout=30)) if streams else call(b"\x0a\x40short", timeout=30)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert method.rsplit("/", 1)[-1] in error.details()
    _assert_no_leak(error.details())


def test_invalid_utf8_on_the_wire_is_invalid_argument(cluster):
    assert _send_invalid_utf8(cluster).code() == grpc.StatusCode.INVALID_ARGUMENT
