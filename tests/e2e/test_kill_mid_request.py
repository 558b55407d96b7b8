"""SIGKILL one encode, one prefill and one decode replica while requests with new images are in
flight (two replicas per stage): no request hangs, only streams already producing on the killed
decode replica may fail (UNAVAILABLE), work in progress elsewhere is re-sent (encode shards and
prefills to the other replica; embeddings lost with their encode owner are re-encoded, a prompt's
KV lost with its prefill owner is prefilled again), and
afterwards every request succeeds."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from epdserve.errors import EpdserveError
from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.sdk import Client

pytestmark = pytest.mark.e2e

CLIENTS, WALL_BOUND_S = 4, 60.0
KILLS = (("encode-1", 1.5), ("prefill-1", 2.5), ("decode-1", 3.5))  # (replica, seconds into the traffic)


def _png(seed: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu",
                           replicas={"encode": 2, "prefill": 2, "decode": 2},
                           stage_args={"router": ("--health-interval-s", "0.2")})
    with LocalCluster(config) as cluster:
        yield cluster


class _Traffic:
    def __init__(self, address: str) -> None:
        self.address, self.lock = address, threading.Lock()
        self.outcomes: list[str] = []
        self.slowest = 0.0

    def run(self, worker: int, until: float) -> None:
        with Client(self.address, timeout_s=WALL_BOUND_S) as client:
            n = 0
            while time.monotonic() < until:
                n += 1
                seed = worker * 10_000 + n
                start = time.monotonic()
                try:  # two new images per request: both encode replicas get a shard
                    result = client.generate(f"picture {seed}?", images=[_png(seed), _png(seed + 5000)],
                                             max_tokens=12, ignore_eos=True, temperature=0.0)
                    outcome = "ok" if len(result.token_ids) == 12 else "short"
                except EpdserveError as exc:
                    outcome = exc.code
                with self.lock:
                    self.outcomes.append(outcome)
                    self.slowest = max(self.slowest, time.monotonic() - start)


def test_replicas_killed_mid_request_are_survived(cluster):
    traffic = _Traffic(cluster.router_address)
    start = time.monotonic()
    workers = [threading.Thread(target=traffic.run, args=(i, start + 6.0)) for i in range(CLIENTS)]
    for worker in workers:
        worker.start()
    for name, at in KILLS:
        time.sleep(max(0.0, start + at - time.monotonic()))
        cluster.children[name].process.kill()
    for worker in workers:
        worker.join(timeout=WALL_BOUND_S * 2)
    assert not any(w.is_alive() for w in workers), "a request hung"
    assert traffic.slowest < WALL_BOUND_S
    failed = [o for o in traffic.outcomes if o != "ok"]
    print(f"{len(traffic.outcomes)} requests, failed {failed}, slowest {traffic.slowest:.2f} s")
    # only a stream already producing on the killed decode replica may fail (UNAVAILABLE); one per
    # client at most. A cache entry lost with its owner (an embedding with encode-1, a prompt's KV
    # with prefill-1 before decode read it) re-runs the stages before it instead.
    assert len(failed) <= CLIENTS and set(failed) <= {"UNAVAILABLE"}, traffic.outcomes
    assert traffic.outcomes.count("ok") >= 3 * CLIENTS

    after = _Traffic(cluster.router_address)
    after.run(0, time.monotonic() + 3.0)
    assert after.outcomes and set(after.outcomes) == {"ok"}, after.outcomes
