"""Encode-stage GPU benchmark (issue: encode service), LLaVA-1.5-7B shapes, fp16, random weights.

1. Raw HF baseline: the checkpoint's CLIP-L/14-336 tower + projector (transformers modules),
   preprocessed pixels already on the GPU, images/s at batch 1/8/32.
2. The encode service (its own process; PNG bytes in, embeddings in mmcache out), driven by
   `--clients` concurrent callers each sending Encode requests of b distinct images with the cache
   lookup skipped: images/s at b = 1/8/32; and the cache-hit latency of one image.
3. Through the router (E -> P, first token only): TTFT and prefill tokens for 1/4/8 images per
   request at keep ratio 1.0 / 0.5 / 0.25.
Writes JSON (--out) and prints a markdown table.

    python bench/encode_gpu.py --out bench/results/encode-h100.json [--model DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import io
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCHES = (1, 8, 32)
IMAGES_PER_REQUEST = (1, 4, 8)
KEEP_RATIOS = (1.0, 0.5, 0.25)


def _png(seed: int, size: int = 336) -> bytes:
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def hf_tower_throughput(model_dir: pathlib.Path, repeats: int) -> dict[int, float]:
    from epdserve.models.loader import load_vision_encoder

    encoder = load_vision_encoder(model_dir, dtype="float16", device="cuda")
    out = {}
    for batch in BATCHES:
        pixels = torch.randn(batch, 3, 336, 336, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            for _ in range(3):
                encoder(pixels)
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                encoder(pixels)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        out[batch] = batch / statistics.median(times)
    del encoder
    torch.cuda.empty_cache()
    return out


def service_throughput(address: str, clients: int, seconds: float) -> tuple[dict[int, float], float, dict]:
    """Images/s through EncodeService.Encode at each batch size, `clients` threads each sending
    requests of b distinct images (cache lookup skipped) for `seconds`. Requests are serialised
    once up front and sent as bytes, so the load generator's own Python stays off the critical path."""
    import grpc

    from epdserve.v1 import common_pb2, encode_pb2

    pool = [_png(i) for i in range(64)]
    channel = grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)])
    encode = channel.unary_unary("/epdserve.v1.EncodeService/Encode", request_serializer=None,
                                 response_deserializer=encode_pb2.EncodeResponse.FromString)

    def serialized(batch: int, offset: int, skip: bool = True) -> bytes:
        images = [common_pb2.ImageInput(data=pool[(offset + i) % len(pool)]) for i in range(batch)]
        return encode_pb2.EncodeRequest(images=images, skip_cache_lookup=skip).SerializeToString()

    breakdown: dict[int, dict[str, list[float]]] = {}

    def request(batch: int, body: bytes):
        response = encode(body, timeout=120)
        for name, ms in response.timings_ms.items():
            breakdown.setdefault(batch, {}).setdefault(name, []).append(ms)
        return response

    out = {}
    for batch in BATCHES:
        bodies = [serialized(batch, worker * batch) for worker in range(clients)]
        for _ in range(2):
            request(batch, bodies[0])

        def client(worker: int, batch: int = batch, bodies: list[bytes] = bodies) -> int:
            done, deadline = 0, time.monotonic() + seconds
            while time.monotonic() < deadline:
                request(batch, bodies[worker])
                done += batch
            return done

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as executor:
            total = sum(executor.map(client, range(clients)))
        out[batch] = total / (time.perf_counter() - start)
    hit = serialized(1, 7, skip=False)
    request(1, hit)
    hits = []
    for _ in range(20):
        start = time.perf_counter()
        response = request(1, hit)
        hits.append((time.perf_counter() - start) * 1000)
        assert response.images[0].cache_hit
    medians = {batch: {name: statistics.median(v) for name, v in parts.items()} for batch, parts in breakdown.items()}
    return out, statistics.median(hits), medians


def ttft(router: str, repeats: int) -> list[dict]:
    from epdserve.sdk import Client

    rows = []
    with Client(router, timeout_s=300) as client:
        seed = 1000
        for images in IMAGES_PER_REQUEST:
            for keep in KEEP_RATIOS:
                samples, prompt_tokens = [], 0
                for _ in range(repeats + 1):
                    seed += images
                    result = client.generate("Describe the pictures.", images=[_png(seed + i) for i in range(images)],
                                             max_tokens=1, temperature=0.0, image_keep_ratio=keep)
                    samples.append(result.timings_ms["ttft_ms"])
                    prompt_tokens = result.usage.prompt_tokens
                rows.append({"images": images, "keep_ratio": keep, "prompt_tokens": prompt_tokens,
                             "ttft_ms": statistics.median(samples[1:])})
    return rows


ENCODE_ARGS = ("--max-batch-size", "32", "--max-batch-wait-ms", "2", "--max-images-per-request", "32",
               "--capacity-bytes", str(4 << 30))
VARIANTS = {"defaults": (), "eager": ("--no-cuda-graphs",), "4 decode threads": ("--decode-threads", "4")}


def encode_variants(model: pathlib.Path, clients: int, seconds: float, names: list[str]) -> dict[str, dict]:
    """The encode service alone (its own process, private Redis), once per VARIANTS entry, same
    clients and images: images/s per batch, cache hit, per-request breakdown."""
    import json as json_

    from epdserve.procutil import spawn, stop_process
    from epdserve.redis_server import PrivateRedis

    results = {}
    redis = PrivateRedis().start()
    try:
        for name in names:
            extra = VARIANTS[name]
            workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"encode-{name}-"))
            ready = workdir / "ready.json"
            process = spawn([sys.executable, "-m", "services.encode", "--model", str(model), "--device", "cuda",
                             "--dtype", "float16", "--redis-url", redis.url, "--ready-file", str(ready),
                             "--shm-dir", str(workdir / "shm"), *ENCODE_ARGS, *extra],
                            stdout=open(workdir / "log", "wb"), stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 600
                while not ready.is_file():
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError((workdir / "log").read_text()[-3000:])
                    time.sleep(0.2)
                address = json_.loads(ready.read_text())["address"]
                service, hit_ms, breakdown = service_throughput(address, clients, seconds)
                results[name] = {"images_per_s": service, "cache_hit_ms": hit_ms, "breakdown_ms": breakdown}
                print(name, "service images/s", service, "hit ms", hit_ms, "\nbreakdown (median ms)", breakdown,
                      flush=True)
            finally:
                stop_process(process, timeout_s=30)
    finally:
        redis.stop()
    return results


def main() -> int:

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=pathlib.Path, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results" / "encode-gpu.json")
    parser.add_argument("--clients", type=int, nargs="+", default=[8],
                        help="concurrent callers (several: each variant at each count)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--service-only", action="store_true",
                        help="only the encode service, CUDA graphs vs eager (no router / TTFT part)")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from bench.llava_checkpoint import build

        started = time.perf_counter()
        model = build(pathlib.Path(tempfile.mkdtemp(prefix="llava7b-")))
        print(f"checkpoint built in {time.perf_counter() - started:.0f} s", flush=True)
    raw = hf_tower_throughput(model, args.repeats * 4)
    print("hf tower images/s", raw, flush=True)
    variants = {}
    for clients in args.clients:
        for name, result in encode_variants(model, clients, args.seconds, args.variants).items():
            variants[name if len(args.clients) == 1 else f"{name}, {clients} clients"] = result
    report = {"benchmark": "encode stage", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "model": "LLaVA-1.5-7B shapes, fp16", "clients": args.clients, "hf_tower_images_per_s": raw,
              "variants": variants, "ttft": []}
    first = next(iter(variants.values()))
    report.update(service_images_per_s=first["images_per_s"], cache_hit_ms=first["cache_hit_ms"],
                  service_vs_hf_at_32=first["images_per_s"][32] / raw[32])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))   # the service part stands even if the rest fails
    if not args.service_only:
        report["ttft"] = _ttft_through_router(model, args.repeats)
        args.out.write_text(json.dumps(report, indent=2))
    print(_markdown(report))
    return 0


def _ttft_through_router(model: pathlib.Path, repeats: int) -> list[dict]:
    from epdserve.launcher import ClusterConfig, LocalCluster

    gib = 1 << 30
    config = ClusterConfig(model_dir=model, device="cuda", start_timeout_s=600, stage_args={
        "encode": ENCODE_ARGS,
        # every request is new: no prefix blocks to reuse; a 4.6k-token 7B KV is 2.4 GB per request
        "prefill": ("--no-prefix-cache", "--capacity-bytes", str(12 * gib)),
        "decode": ("--capacity-bytes", str(gib // 4)),
    })
    with LocalCluster(config) as cluster:
        return ttft(cluster.router_address, repeats)


def _markdown(report: dict) -> str:
    names = list(report["variants"])
    lines = [f"Encode stage on {report['device']} ({report['model']}), {report['date'][:10]}, "
             f"{'/'.join(map(str, report['clients']))} clients", "",
             "| batch | HF tower + projector (img/s) | " + " | ".join(f"service, {n} (img/s) | {n} / HF" for n in names)
             + " |", "|---:|---:|" + "---:|---:|" * len(names)]
    for b in BATCHES:
        hf = report["hf_tower_images_per_s"][b]
        cells = [f"{v['images_per_s'][b]:.0f} | {v['images_per_s'][b] / hf:.2f}" for v in report["variants"].values()]
        lines.append(f"| {b} | {hf:.0f} | " + " | ".join(cells) + " |")
    lines += ["", f"cache hit, one image: {report['cache_hit_ms']:.2f} ms"]
    if report["ttft"]:
        lines += ["", "| images | keep | prompt tokens | TTFT (ms) |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['images']} | {r['keep_ratio']} | {r['prompt_tokens']} | {r['ttft_ms']:.1f} |"
                  for r in report["ttft"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
