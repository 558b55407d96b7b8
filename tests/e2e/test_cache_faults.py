"""Cache faults through the real services: Redis stalled (`CLIENT PAUSE`) and Redis killed and
restarted mid-traffic. Requests keep completing with the same tokens and bounded latency; the
cache recovers; at the end no child process, shared-memory file or TTL-less index entry is left."""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import redis
from PIL import Image

from epdserve.launcher import LAUNCHER_PID_FILE, ClusterConfig, LocalCluster
from epdserve.procutil import stop_process, stop_processes
from epdserve.sdk import Client
from epdserve.v1 import cache_pb2, cache_pb2_grpc

pytestmark = pytest.mark.e2e
REDIS_TIMEOUT_S = 0.5


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _index_available(cluster, stage: str) -> bool:
    with grpc.insecure_channel(cluster.children[stage].address) as channel:
        return cache_pb2_grpc.CacheControlStub(channel).Stats(cache_pb2.StatsRequest(), timeout=5).index_available


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    fast = ("--redis-timeout-s", str(REDIS_TIMEOUT_S), "--heartbeat-interval-s", "0.3")
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu",
                           stage_args={"encode": fast, "prefill": fast, "decode": fast})
    cluster = LocalCluster(config)
    cluster.start()
    yield cluster
    pids = cluster.pids()
    # the services first (as LocalCluster.stop does), so what they leave can be seen before it is wiped
    stop_process(cluster.children["router"].process, timeout_s=15)
    stop_processes([c.process for name, c in cluster.children.items() if name != "router"], timeout_s=15)
    pools = [str(p) for p in cluster.shm_root.rglob("*") if p.is_file() and p.name != LAUNCHER_PID_FILE]
    registered = _keys_without_ttl(cluster.redis_url, registry_too=True)
    codes = cluster.stop()
    assert all(code == 0 for code in codes.values()), codes
    assert [name for name, pid in pids.items() if _alive(pid)] == [], "processes outlived the cluster"
    assert pools == [], "shared-memory files left by stopped services"
    assert registered == [], "TTL-less Redis keys left by stopped services"


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout_s=60) as client:
        yield client


def _generate(client, image: bytes):
    return client.generate("describe", images=[image], max_tokens=4, temperature=0.0, ignore_eos=True)


def _keys_without_ttl(url: str, registry_too: bool = False) -> list[str]:
    """Index keys that would never expire: every entry, heartbeat and readiness stream has a TTL;
    only the owner registry (a hash) and each owner's key set are kept until the owner leaves
    (`registry_too` counts them as well: after every owner has left)."""
    r = redis.Redis.from_url(url)
    try:
        return [key.decode() for key in r.scan_iter(count=1000) if r.pttl(key) == -1 and
                (registry_too or not (key.decode().endswith(":owners") or b":owned:" in key))]
    finally:
        r.close()


def test_a_stalled_redis_delays_requests_at_most_a_redis_timeout_each(cluster, client):
    """`CLIENT PAUSE` stalls every index call; hand-offs carry their owner's location, so requests
    (a new image: encode, prefill and decode all publish and fetch) still finish well inside the
    pause, and give the tokens they give with Redis back."""
    _generate(client, _png(1))
    paused_s = 4.0
    pauser = redis.Redis.from_url(cluster.redis_url)
    pauser.execute_command("CLIENT", "PAUSE", int(paused_s * 1000), "ALL")
    started = time.monotonic()
    try:
        during = [_generate(client, _png(100 + i)) for i in range(2)]
        stalled_s = time.monotonic() - started
    finally:
        pauser.execute_command("CLIENT", "UNPAUSE")
        pauser.close()
    print(f"two requests with Redis paused: {stalled_s:.2f} s")
    assert stalled_s < paused_s * 0.75, f"two requests took {stalled_s:.2f} s with Redis paused"
    deadline = time.monotonic() + 10
    while not all(_index_available(cluster, stage) for stage in ("encode", "prefill", "decode")):
        assert time.monotonic() < deadline, "the services did not come back to Redis after the pause"
        time.sleep(0.1)
    after = [_generate(client, _png(100 + i)) for i in range(2)]
    assert [r.token_ids for r in during] == [r.token_ids for r in after]
    assert _keys_without_ttl(cluster.redis_url) == []


def test_requests_survive_redis_dying_and_the_cache_recovers(cluster, client):
    image = _png(1)
    baseline = _generate(client, image)
    results, errors, stop = [], [], threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                results.append(_generate(client, image))
            except Exception as exc:  # noqa: BLE001 - every failure is a test failure
                errors.append(exc)

    worker = threading.Thread(target=traffic)
    worker.start()
    time.sleep(1.0)
    cluster.redis.kill()
    killed_at = len(results)
    time.sleep(3.0)
    during = len(results) - killed_at
    assert not _index_available(cluster, "encode")          # the gauge went to 0
    cluster.redis.restart()
    deadline = time.monotonic() + 20
    while not (_index_available(cluster, "encode") and _index_available(cluster, "prefill")):
        assert time.monotonic() < deadline, "the services did not reconnect to Redis"
        time.sleep(0.3)
    time.sleep(1.5)
    stop.set()
    worker.join(timeout=60)
    assert errors == [], errors[:3]
    assert during >= 3, "requests stalled while Redis was away"
    assert all(r.token_ids == baseline.token_ids for r in results)
    hit = client.generate("describe", images=[image], max_tokens=4, temperature=0.0)
    assert hit.timings_ms["encode_cache_hits"] == 1, "cache hits did not come back after Redis returned"
    assert _keys_without_ttl(cluster.redis_url) == []


def test_kv_lost_before_decode_read_it_is_prefilled_again(tiny_checkpoint):
    """The prompt's KV is damaged after prefill answered and before decode read it (as when its
    owner dies and is cleaned up in between): decode refuses it (FAILED_PRECONDITION), the router
    re-runs prefill and decode continues from the first token already streamed. The answer equals
    an undisturbed run's and no KV is left behind. Decode is held with SIGSTOP to open the window;
    prefill's prefix cache is off so only this request's KV sits in its pool."""
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu", stage_args={"prefill": ("--no-prefix-cache",)})
    args = dict(images=[_png(70)], max_tokens=8, temperature=0.0, ignore_eos=True)
    with LocalCluster(config) as cluster, Client(cluster.router_address, timeout_s=60) as client:
        r = redis.Redis.from_url(cluster.redis_url)
        decode = cluster.children["decode"].process.pid
        os.kill(decode, signal.SIGSTOP)
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                future = pool.submit(client.generate, "lost kv?", **args)
                deadline = time.monotonic() + 30
                while not list(r.scan_iter(match="*:e:kv:*")):
                    assert time.monotonic() < deadline and not future.done(), "prefill never published KV"
                    time.sleep(0.02)
                time.sleep(0.5)  # every layer written
                for path in (cluster.shm_root / "prefill").glob("pool-*.shm"):
                    _damage_head(path)
                os.kill(decode, signal.SIGCONT)
                lost = future.result(timeout=60)
        finally:
            os.kill(decode, signal.SIGCONT)
        undisturbed = client.generate("lost kv?", **args)
        assert lost.timings_ms["kv_lost_reprefills"] == 1
        assert "kv_lost_reprefills" not in undisturbed.timings_ms
        assert lost.token_ids == undisturbed.token_ids
        deadline = time.monotonic() + 10
        while list(r.scan_iter(match="*:e:kv:*")):
            assert time.monotonic() < deadline, "KV index entries left behind"
            time.sleep(0.1)


def _damage_head(path, nbytes: int = 4 << 20) -> None:
    with open(path, "r+b") as f:
        head = bytearray(f.read(nbytes))
        f.seek(0)
        f.write(bytes(b ^ 0xFF for b in head))
