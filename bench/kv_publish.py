"""KV publishing cost on this host: what prefill's layer-wise publishing does for one prompt of a
7B model, without a GPU. 32 layers of [2, 32, 3300, 128] fp16 (54 MB each, a 3,300-token Llama-2-7B
prompt) are put one at a time into a real MMCache (real redis-server, shared-memory pool), as
ephemeral leased hand-offs, then released; repeated for several prompts. Reports the first prompt
(fresh pool pages) and the median of the rest, with and without --preallocate-pool.

    python bench/kv_publish.py [--prompts 5] [--tokens 3300] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


async def publish_prompts(redis_url: str, layers, prompts: int, preallocate: bool) -> list[float]:
    from epdserve.config import CacheConfig
    from mmcache.client import CacheIdentity, MMCache

    nbytes = sum(layer.numel() * layer.element_size() for layer in layers)
    config = CacheConfig(redis_url=redis_url, namespace=f"bench-{uuid.uuid4().hex[:6]}",
                         shm_dir=tempfile.mkdtemp(dir="/dev/shm"), capacity_bytes=4 * nbytes,
                         preallocate_pool=preallocate)
    cache = await MMCache.open(config, CacheIdentity(f"bench-{uuid.uuid4().hex[:6]}", ""))
    try:
        times = []
        for prompt in range(prompts):
            start = time.perf_counter()
            refs = []
            for i, layer in enumerate(layers):
                refs += await cache.put_many([(f"kv:{prompt}:{i}", layer)], ttl_s=60, lease_s=60, ephemeral=True)
            times.append(time.perf_counter() - start)
            await cache.release(refs)
        return times
    finally:
        await cache.close()
        shutil.rmtree(config.shm_dir, ignore_errors=True)


def main() -> int:
    import torch

    from epdserve.redis_server import PrivateRedis
    from mmcache.client import _worker_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=3300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    layers = [torch.empty(2, 32, args.tokens, 128, dtype=torch.float16).normal_() for _ in range(32)]
    redis = PrivateRedis().start()
    try:
        result = {"layers": 32, "layer_mb": round(layers[0].numel() * 2 / 1e6, 1), "cores": os.cpu_count(),
                  "worker_threads": _worker_count()}
        for preallocate in (False, True):
            times = asyncio.run(publish_prompts(redis.url, layers, args.prompts, preallocate))
            label = "preallocated" if preallocate else "sparse"
            result[f"{label}_first_ms"] = round(times[0] * 1000, 1)
            result[f"{label}_median_ms"] = round(statistics.median(times[1:]) * 1000, 1)
    finally:
        redis.stop()
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
