"""End to end: real service processes (encode, prefill, decode, router) over gRPC on loopback,
a real redis-server, the tiny checkpoint on disk, driven through the SDK."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
from PIL import Image

from epdserve.errors import InvalidArgumentError, ResourceExhaustedError
from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.sdk import Client

pytestmark = pytest.mark.e2e


def _png(seed: int, size=(48, 40)) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    cluster = LocalCluster(ClusterConfig(model_dir=tiny_checkpoint, device="cpu", log_level="INFO"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout_s=120) as client:
        yield client


def test_greedy_generation_equals_transformers(client, tiny_checkpoint, hf_greedy):
    images = [_png(1), _png(2, (20, 64))]
    result = client.generate("What is in these pictures?", images=images, max_tokens=16, temperature=0.0,
                             ignore_eos=True)
    assert list(result.token_ids) == hf_greedy(tiny_checkpoint, "What is in these pictures?", images, 16)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 16
    assert result.usage.image_tokens == 2 * 16


def test_stream_text_and_timings(client, tiny_checkpoint):
    from transformers import AutoTokenizer

    stream = client.stream("Tell me about it", images=[_png(3)], max_tokens=12, temperature=0.0, ignore_eos=True)
    chunks = list(stream)
    result = stream.result
    assert "".join(c.text for c in chunks) == result.text
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert result.text == tokenizer.decode(list(result.token_ids), skip_special_tokens=True)
    for key in ("encode.encode_ms", "encode.cache_put_ms", "prefill.cache_get_ms", "prefill.prefill_ms",
                "prefill.kv_publish_ms", "decode.kv_fetch_ms", "kv_handoff_ms", "ttft_ms", "tpot_ms", "total_ms"):
        assert result.timings_ms[key] >= 0, key
    assert result.timings_ms["ttft_ms"] <= result.timings_ms["total_ms"]


def test_repeated_image_is_not_encoded_again(client):
    image = _png(4)
    first = client.generate("one", images=[image], max_tokens=2, temperature=0.0)
    second = client.generate("two", images=[image], max_tokens=2, temperature=0.0)
    assert first.timings_ms["encode_cache_hits"] == 0 and "encode.encode_ms" in first.timings_ms
    assert second.timings_ms["encode_cache_hits"] == 1 and "encode.encode_ms" not in second.timings_ms


def test_text_only_request(client, tiny_checkpoint, hf_greedy):
    result = client.generate("Hello!", max_tokens=8, temperature=0.0, ignore_eos=True)
    assert list(result.token_ids) == hf_greedy(tiny_checkpoint, "Hello!", [], 8)
    assert result.usage.image_tokens == 0


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(images=[_png(5)], max_tokens=12, temperature=1.0, ignore_eos=True)
    a = client.generate("sample", seed=7, **kwargs)
    b = client.generate("sample", seed=7, **kwargs)
    c = client.generate("sample", seed=8, **kwargs)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_max_tokens_one_and_stop_string(client):
    one = client.generate("x", images=[_png(6)], max_tokens=1, temperature=0.0)
    assert one.usage.completion_tokens == 1 and one.finish_reason in ("length", "stop")
    full = client.generate("y", images=[_png(6)], max_tokens=16, temperature=0.0, ignore_eos=True)
    stop = next((full.text[i:i + 2] for i in range(3, len(full.text) - 1) if full.text[i:i + 2].strip()), None)
    if stop is None:
        pytest.skip("generated text has no usable stop string")
    cut = client.generate("y", images=[_png(6)], max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(images=[b"not an image"]), InvalidArgumentError, r"images\[0\]: not a decodable image"),
        (dict(images=[_png(1)[:60]]), InvalidArgumentError, r"images\[0\]: corrupt or truncated"),
        (dict(images=[b""]), InvalidArgumentError, r"images\[0\]: image is empty"),
        (dict(images=[_png(1)], raw=True), InvalidArgumentError, "0 image placeholder"),
        (dict(max_tokens=5000), InvalidArgumentError, r"exceeds the model's context length \(2048\)"),
        (dict(max_tokens=0), InvalidArgumentError, "max_tokens: must be >= 1"),
        (dict(temperature=-1.0), InvalidArgumentError, "temperature must be a finite number >= 0"),
        (dict(top_p=0.0), InvalidArgumentError, r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), InvalidArgumentError, r"top_p must be in \(0, 1\]"),
        (dict(top_k=-5), InvalidArgumentError, "top_k"),
        (dict(stop=[""]), InvalidArgumentError, r"params.stop\[0\]"),
        (dict(images=[_png(1)] * 17), InvalidArgumentError, r"max_images_per_request \(16\)"),
    ],
)
def test_bad_input_gets_a_clear_error_and_service_keeps_serving(client, kwargs, error, message):
    with pytest.raises(error, match=message):
        client.generate("Describe the image", **{"max_tokens": 4, **kwargs})
    assert client.generate("still fine?", max_tokens=2).usage.completion_tokens >= 1


def test_oversized_prompt_is_resource_exhausted(client):
    with pytest.raises(ResourceExhaustedError, match="max_prompt_bytes"):
        client.generate("x" * ((1 << 20) + 1), max_tokens=1)


def test_concurrent_requests_share_decode_steps_and_keep_their_tokens(client):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"batch member {i}" for i in range(4)]

    def run(prompt):
        return client.generate(prompt, max_tokens=40, temperature=0.0, ignore_eos=True)

    alone = [run(p).token_ids for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    assert [r.token_ids for r in together] == alone
    assert max(r.timings_ms["decode.decode_batch_max"] for r in together) >= 2


def test_abort_stops_a_running_request(client):
    stream = client.stream("long one", images=[_png(8)], max_tokens=1500, temperature=0.0, ignore_eos=True,
                           request_id="abort-me")
    received = 0
    for chunk in stream:
        received += len(chunk.token_ids)
        if received == 3:
            assert client.abort("abort-me") is True
    assert stream.result.finish_reason == "abort"
    assert stream.result.usage.completion_tokens < 1500
    assert client.abort("abort-me") is False


def test_client_cancel_mid_stream_frees_everything(client, cluster):
    stream = client.stream("cancel me", images=[_png(9)], max_tokens=1500, temperature=0.0, ignore_eos=True)
    for i, _ in enumerate(stream):
        if i == 3:
            stream.cancel()
            break
    assert client.generate("after cancel", max_tokens=2).usage.completion_tokens >= 1
    _assert_no_kv_left(cluster)


def _assert_no_kv_left(cluster, timeout_s: float = 10.0):
    """Every KV hand-off prefill published has been released: prefill holds no `kv:` entry, no lease,
    and the index has no `kv:` key."""
    import grpc
    import redis

    from epdserve.v1 import cache_pb2, cache_pb2_grpc

    r = redis.Redis.from_url(cluster.redis_url)
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(cluster.children["prefill"].address) as channel:
        stub = cache_pb2_grpc.CacheControlStub(channel)
        while True:
            keys = [k for k in r.scan_iter(match="*:e:kv:*")]
            stats = stub.Stats(cache_pb2.StatsRequest(), timeout=5)
            if not keys and stats.entries_by_kind.get("kv", 0) == 0 and stats.leases == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"KV left behind: {len(keys)} index keys, {dict(stats.entries_by_kind)}, "
                                     f"{stats.leases} leases")
            time.sleep(0.2)


def test_no_kv_is_left_after_requests(client, cluster):
    for i in range(3):
        client.generate("leak check", images=[_png(20 + i)], max_tokens=3, temperature=0.0)
    _assert_no_kv_left(cluster)


def test_stop_leaves_no_process_behind(tiny_checkpoint):
    cluster = LocalCluster(ClusterConfig(model_dir=tiny_checkpoint, device="cpu"))
    cluster.start()
    with Client(cluster.router_address, timeout_s=60) as client:
        assert client.generate("hi", max_tokens=2).usage.completion_tokens >= 1
    pids = cluster.pids()
    shm_root = cluster.shm_root
    codes = cluster.stop()
    assert codes == {"router": 0, "encode": 0, "prefill": 0, "decode": 0}, cluster.stop_log_tails
    for name, pid in pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) still running"
    assert not shm_root.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_every_service_reports_serving_health(cluster):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for name, child in cluster.children.items():
        with grpc.insecure_channel(child.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1, name
            with pytest.raises(grpc.RpcError) as err:
                stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_async_client(cluster):
    import asyncio

    from epdserve.sdk import AsyncClient

    async def run():
        async with AsyncClient(cluster.router_address, timeout_s=60) as client:
            info = await client.model_info()
            stream = client.stream("async", images=[_png(30)], max_tokens=5, temperature=0.0, ignore_eos=True)
            texts = [chunk.text async for chunk in stream]
            whole = await client.generate("async", images=[_png(30)], max_tokens=5, temperature=0.0, ignore_eos=True)
            return info, texts, stream.result, whole

    info, texts, streamed, whole = asyncio.run(run())
    assert info.max_context == 2048 and info.image_tokens_per_image == 16 and info.image_placeholder == "<image>"
    assert "".join(texts) == streamed.text
    assert streamed.token_ids == whole.token_ids


def test_invalid_unicode_prompt_is_rejected_client_side(client):
    with pytest.raises(InvalidArgumentError, match="not valid UTF-8"):
        client.generate("bad \ud800 surrogate", max_tokens=1)


def test_unicode_prompt_round_trips(client):
    result = client.generate("emoji 🙂, RTL עברית, e\u0301, zwj 👩‍👩‍👧, nul \x00", max_tokens=3, temperature=0.0)
    assert result.usage.prompt_tokens > 20


def test_remote_transfer_path_gives_identical_tokens(tiny_checkpoint, client):
    """Prefill and decode pull their inputs over the gRPC chunked stream instead of shared memory:
    same tokens as the shared-memory path."""
    images = [_png(40), _png(41)]
    args = dict(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = client.generate("remote?", images=images, **args).token_ids
    remote = ("--no-prefer-shared-memory", "--fetch-chunk-bytes", "1000", "--log-level", "DEBUG")
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu",
                           stage_args={"prefill": remote, "decode": remote})
    with LocalCluster(config) as other, Client(other.router_address, timeout_s=60) as other_client:
        assert other_client.generate("remote?", images=images, **args).token_ids == expected
        _assert_no_kv_left(other)
        assert "streamed img:" in other.log_tail("prefill", 400)  # the embeddings came over gRPC
        assert "streamed kv:" in other.log_tail("decode", 400)    # and so did the KV


def test_corrupt_cached_embedding_is_recomputed_not_served(client, cluster):
    """A cached embedding whose bytes were damaged after encoding: prefill refuses it (checksum),
    the router re-runs encode without the cache lookup, and the answer is unchanged."""
    image = _png(50)
    first = client.generate("same?", images=[image], max_tokens=6, temperature=0.0, ignore_eos=True)
    for path in (cluster.shm_root / "encode").glob("pool-*.shm"):  # damage the pool's used head
        with open(path, "r+b") as f:
            head = bytearray(f.read(1 << 20))
            f.seek(0)
            f.write(bytes(b ^ 0xFF for b in head))
    again = client.generate("same?", images=[image], max_tokens=6, temperature=0.0, ignore_eos=True)
    assert again.token_ids == first.token_ids
    assert again.timings_ms["encode_cache_hits"] == 0  # the retry re-encoded
    assert "encode.encode_ms" in again.timings_ms


def _generate_until(client, predicate, timeout_s: float = 10.0, **kwargs):
    """Prefix blocks are published after the response: repeat a request until `predicate` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = client.generate(**kwargs)
        if predicate(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_repeated_prefix_is_loaded_not_recomputed(client, tiny_checkpoint, hf_greedy):
    system = "You are a careful assistant who describes pictures in plain words. " * 2
    image = _png(60)
    args = dict(images=[image], max_tokens=8, temperature=0.0, ignore_eos=True)
    cold = client.generate(prompt=system + "First question?", **args)
    assert cold.timings_ms["prefill.prefix_hit_tokens"] == 0
    warm = _generate_until(client, lambda r: r.timings_ms["prefill.prefix_hit_tokens"] > 0,
                           prompt=system + "First question?", **args)
    assert warm.timings_ms["prefill.prefix_hit_tokens"] >= 32
    assert warm.timings_ms["prefill.computed_tokens"] < cold.timings_ms["prefill.computed_tokens"]
    # the router saw the same cached prefix in the index before choosing the replica (Mooncake)
    assert cold.timings_ms["predicted_cached_tokens"] == 0
    assert warm.timings_ms["predicted_cached_tokens"] == warm.timings_ms["prefill.prefix_hit_tokens"]
    assert warm.token_ids == cold.token_ids
    other = client.generate(prompt=system + "A different question, then?", **args)
    assert other.timings_ms["prefill.prefix_hit_tokens"] >= 32      # the shared prefix (image included)
    assert list(other.token_ids) == hf_greedy(tiny_checkpoint, system + "A different question, then?", [image], 8)
    swapped = client.generate(prompt=system + "First question?", **{**args, "images": [_png(61)]})
    assert swapped.timings_ms["prefill.prefix_hit_tokens"] == 0   # another image changes every block after it


def test_tenants_never_share_cache_entries(tiny_checkpoint, tmp_path):
    secret = tmp_path / "salt"
    secret.write_bytes(os.urandom(32))
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu",
                           stage_args={"router": ("--tenant-salt-file", str(secret))})
    prompt = "A shared system prompt that is long enough to fill a prefix block or two. " * 2
    args = dict(images=[_png(70)], max_tokens=4, temperature=0.0, ignore_eos=True)
    with LocalCluster(config) as cluster:
        with Client(cluster.router_address, tenant="alice") as alice, \
                Client(cluster.router_address, tenant="bob") as bob:
            first = alice.generate(prompt, **args)
            again = _generate_until(alice, lambda r: r.timings_ms["prefill.prefix_hit_tokens"] > 0, prompt=prompt,
                                    **args)
            assert again.timings_ms["encode_cache_hits"] == 1 and again.timings_ms["prefill.prefix_hit_tokens"] > 0
            other = bob.generate(prompt, **args)
            assert other.timings_ms["encode_cache_hits"] == 0            # same image, other tenant: a miss
            assert other.timings_ms["prefill.prefix_hit_tokens"] == 0    # same prompt, other tenant: a miss
            assert other.token_ids == first.token_ids                    # and the same answer
