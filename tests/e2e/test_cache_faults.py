"""Cache faults through the real services: Redis killed and restarted mid-traffic."""

from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.sdk import Client
from epdserve.v1 import cache_pb2, cache_pb2_grpc

pytestmark = pytest.mark.e2e


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _index_available(cluster, stage: str) -> bool:
    with grpc.insecure_channel(cluster.children[stage].address) as channel:
        return cache_pb2_grpc.CacheControlStub(channel).Stats(cache_pb2.StatsRequest(), timeout=5).index_available


def test_requests_survive_redis_dying_and_the_cache_recovers(tiny_checkpoint):
    fast = ("--redis-timeout-s", "0.5", "--heartbeat-interval-s", "0.3")
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu",
                           stage_args={"encode": fast, "prefill": fast, "decode": fast})
    image = _png(1)
    with LocalCluster(config) as cluster, Client(cluster.router_address, timeout_s=60) as client:
        baseline = client.generate("describe", images=[image], max_tokens=4, temperature=0.0, ignore_eos=True)
        results, errors, stop = [], [], threading.Event()

        def traffic():
            while not stop.is_set():
                try:
                    results.append(client.generate("describe", images=[image], max_tokens=4, temperature=0.0,
                                                   ignore_eos=True))
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
