"""KV publishing cost: what prefill's layer-wise publishing does for one prompt of a 7B model.
32 layers of [2, 32, 3300, 128] fp16 (54 MB each, a 3,300-token Llama-2-7B prompt) are published
through the prefill's own `LayerPublisher` into a real MMCache (real redis-server, shared-memory
pool) as ephemeral leased hand-offs, then released; repeated for several prompts. The layers are
already computed (on --device), so this is the hand-off alone, the most it can cost a prefill.
Reports the first prompt (fresh pool pages) and the median of the rest, per path:

- put-sparse / put: each layer to a host tensor (pinned, on a GPU), then put into the cache (copy
  + checksum), into a sparse or preallocated pool: what prefill did before it reserved its KV;
- staged: the KV reserved in the pool first; each layer to a host tensor (pinned on a GPU), then
  copied into its region by worker threads (a GPU whose pool could not be page-locked, or
  --no-kv-zero-copy; and every CPU prefill);
- direct: the KV reserved in the pool first, each layer copied straight into its region (the pool
  page-locked on a GPU; forced on a CPU, the copy runs on the model thread): only the checksum after.

With --reader, each prompt's published layers are then fetched as decode fetches them, by a
second process (another cache owner on this host): `get_many` (mapped in place, verified) and
each layer copied to --device, then released; `<path>_fetch_*` report that, `<path>_corrupt` the
reads whose in-place bytes failed verification (fetched from the owner instead). The reader maps
the owner's pool as decode does (`copy`: private, copy-on-write) or, to compare, `shared`
(read-only, shared).

    python bench/kv_publish.py [--device cpu|cuda] [--prompts 5] [--tokens 3300] [--reader [copy|shared]] [--json]
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
PATHS = ("put-sparse", "put", "staged", "direct")


async def publish_prompts(redis_url: str, layers, prompts: int, path: str, reader: str | None = None) -> dict:
    import torch

    from epdserve.config import CacheConfig, PrefillConfig
    from mmcache.client import CacheIdentity, MMCache
    from services.load import LoadTracker
    from services.prefill.publish import KVLayout, LayerPublisher
    from services.runtime import ModelExecutor, Stopwatch

    nbytes = sum(layer.numel() * layer.element_size() for layer in layers)
    device = layers[0].device
    config = CacheConfig(redis_url=redis_url, namespace=f"bench-{uuid.uuid4().hex[:6]}",
                         shm_dir=tempfile.mkdtemp(dir="/dev/shm"), capacity_bytes=4 * nbytes,
                         preallocate_pool=path != "put-sparse")
    cache = await MMCache.open(config, CacheIdentity(f"bench-{uuid.uuid4().hex[:6]}", ""))
    executor = ModelExecutor("bench", calls_serve_one_request=True)
    if path == "direct" and device.type == "cuda" and not cache.page_lock_pool():
        raise SystemExit("direct: the pool could not be page-locked")
    publisher = LayerPublisher(cache, executor, PrefillConfig(), LoadTracker("prefill", ""), device)
    publisher.direct = path == "direct"
    shape = layers[0].shape
    layout = KVLayout((shape[2],) * len(layers), shape[1], shape[3], layers[0].dtype)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def hand_off(*, on_layer, host):  # the model thread's part: each finished layer to the host
        for i, layer in enumerate(layers):
            tensor, ready = host.take(i, layer, stream)
            on_layer(i, tensor, ready)

    fetcher = await Fetcher.start(redis_url, config.namespace, str(device), reader) if reader else None
    try:
        times: dict[str, list[float]] = {"publish": [], "fetch": [], "get": [], "corrupt": []}
        for prompt in range(prompts):
            start = time.perf_counter()
            if path.startswith("put"):
                refs = await put_each_layer(cache, layers, stream, prompt)
            else:
                reserved = await publisher.reserve(layout, timeout_s=10)
                _, refs = await publisher.run(hand_off, reserved, Stopwatch(), shape[2])
            times["publish"].append(time.perf_counter() - start)
            if fetcher is None:
                await cache.release(refs)
                continue
            fetched = await fetcher.fetch(refs)
            times["fetch"].append(fetched["seconds"])
            times["get"].append(fetched["get_s"])
            times["corrupt"].append(fetched["corrupt"])
        return times
    finally:
        if fetcher is not None:
            await fetcher.stop()
        executor.shutdown()
        await cache.close()
        shutil.rmtree(config.shm_dir, ignore_errors=True)


class Fetcher:
    """The decode side in its own process (`--fetch-as-decode`): refs in (one JSON line of base64
    TensorRefs per prompt on stdin), one JSON line out per prompt: seconds to get, copy to the
    device and release, and how many reads failed in-place verification so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, redis_url: str, namespace: str, device: str, mapping: str) -> "Fetcher":
        process = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), "--fetch-as-decode", redis_url, namespace, device, mapping,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return cls(process)

    async def fetch(self, refs) -> dict:
        import base64

        line = json.dumps([base64.b64encode(ref.SerializeToString()).decode() for ref in refs]) + "\n"
        self.process.stdin.write(line.encode())
        await self.process.stdin.drain()
        answer = await self.process.stdout.readline()
        if not answer:
            raise RuntimeError("the fetching process ended early")
        return json.loads(answer)

    async def stop(self) -> None:
        self.process.stdin.close()
        await self.process.wait()


def _read_through_shared_mappings() -> None:
    """This process maps other owners' pools read-only and shared instead of copy-on-write."""
    import mmap
    import warnings

    from mmcache.pool import PoolMappings

    def shared_map(path: str, size: int) -> memoryview:
        with open(path, "rb") as f:
            return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ))

    PoolMappings._map = staticmethod(shared_map)
    warnings.filterwarnings("ignore", message="The given buffer is not writable")


async def fetch_as_decode(redis_url: str, namespace: str, device: str, mapping: str) -> None:
    import base64

    import torch

    from epdserve.config import CacheConfig
    from epdserve.v1 import common_pb2
    from mmcache.client import CacheIdentity, MMCache

    if mapping == "shared":
        _read_through_shared_mappings()
    config = CacheConfig(redis_url=redis_url, namespace=namespace, shm_dir=tempfile.mkdtemp(dir="/dev/shm"),
                         capacity_bytes=64 << 20)
    cache = await MMCache.open(config, CacheIdentity(f"fetch-{uuid.uuid4().hex[:6]}", ""))
    try:
        for line in sys.stdin:
            refs = [common_pb2.TensorRef.FromString(base64.b64decode(item)) for item in json.loads(line)]
            start = time.perf_counter()
            layers = await cache.get_many(refs)
            got = time.perf_counter()
            if any(layer is None for layer in layers):
                raise SystemExit("fetch: an entry was missing")
            for layer in layers:  # as decode's admission loads each layer into its KV blocks
                layer.to(device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            await cache.release(refs)
            seconds = time.perf_counter() - start
            print(json.dumps({"seconds": seconds, "get_s": got - start, "corrupt": cache.metrics.value("corrupt")}),
                  flush=True)
    finally:
        await cache.close()
        shutil.rmtree(config.shm_dir, ignore_errors=True)


async def put_each_layer(cache, layers, stream, prompt: int) -> list:
    """The earlier path: each layer to a fresh host tensor, then `put_many` copies it into the pool."""
    from services.prefill.layer_kv import StagedHost

    staged, refs = StagedHost(), []
    for i, layer in enumerate(layers):
        tensor, ready = staged.take(i, layer, stream)
        await asyncio.to_thread(ready)
        refs += await cache.put_many([(f"kv:{prompt}:{i}", tensor)], ttl_s=60, lease_s=60, ephemeral=True)
    return refs


def main() -> int:
    import torch

    from epdserve.redis_server import PrivateRedis
    from mmcache.client import _worker_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=3300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--reader", nargs="?", const="copy", choices=("copy", "shared"),
                        help="fetch each prompt's KV from a second process (its pool mapping: copy or shared)")
    parser.add_argument("--fetch-as-decode", nargs=4, metavar=("REDIS_URL", "NAMESPACE", "DEVICE", "MAPPING"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fetch_as_decode:
        asyncio.run(fetch_as_decode(*args.fetch_as_decode))
        return 0
    layers = [torch.empty(2, 32, args.tokens, 128, dtype=torch.float16, device=args.device).normal_()
              for _ in range(32)]
    redis = PrivateRedis().start()
    try:
        result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  "layers": 32, "layer_mb": round(layers[0].numel() * 2 / 1e6, 1), "cores": os.cpu_count(),
                  "worker_threads": _worker_count(), "reader_mapping": args.reader or ""}
        for path in PATHS:
            times = asyncio.run(publish_prompts(redis.url, layers, args.prompts, path, args.reader))
            for phase in ("publish", "fetch", "get") if args.reader else ("publish",):
                name = path if phase == "publish" else f"{path}_{phase}"
                result[f"{name}_first_ms"] = round(times[phase][0] * 1000, 1)
                result[f"{name}_median_ms"] = round(statistics.median(times[phase][1:]) * 1000, 1)
            if args.reader:
                result[f"{path}_corrupt"] = times["corrupt"][-1]
    finally:
        redis.stop()
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
