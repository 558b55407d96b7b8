"""Latency breakdown of the demo request (one image + text) on a local cluster.

Starts the four services + a private redis-server on this machine, sends the demo request
`--warmup` times (discarded: first-call costs) and then `--repeats` times with a new image each
time (cache miss path) and `--repeats` times with the same image (embedding-cache hit path),
and writes per-stage medians as JSON and a markdown table.

    python bench/cpu_demo_latency.py [--model DIR] [--device cpu] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import pathlib
import platform
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEYS = (
    "encode.decode_ms", "encode.cache_lookup_ms", "encode.encode_ms", "encode.cache_put_ms", "encode_rpc_ms",
    "prefill.cache_get_ms", "prefill.prefill_ms", "prefill.kv_publish_ms", "prefill_rpc_ms",
    "decode.kv_fetch_ms", "kv_handoff_ms", "ttft_ms", "tpot_ms", "total_ms",
)


def _image(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (96, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _run(client, image: bytes, max_tokens: int) -> dict[str, float]:
    result = client.generate("What is in this picture?", images=[image], max_tokens=max_tokens,
                             temperature=0.0, ignore_eos=True)
    return result.timings_ms


def _medians(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in KEYS if all(k in s for s in samples)}


def main() -> int:
    from epdserve.env import read_env
    from epdserve.launcher import ClusterConfig, LocalCluster
    from epdserve.models.tiny import cached_tiny_checkpoint
    from epdserve.sdk import Client

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=pathlib.Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    model = args.model or cached_tiny_checkpoint(read_env().cache_dir)
    with LocalCluster(ClusterConfig(model_dir=model, device=args.device)) as cluster:
        with Client(cluster.router_address, timeout_s=300) as client:
            for i in range(args.warmup):
                _run(client, _image(10_000 + i), args.max_tokens)
            miss = [_run(client, _image(i), args.max_tokens) for i in range(args.repeats)]
            hit = [_run(client, _image(0), args.max_tokens) for _ in range(args.repeats)]
    report = {
        "benchmark": "demo request latency breakdown (median ms)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {_cpu_count()} cores, device={args.device}",
        "model": str(model.name),
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "embedding_cache_miss": _medians(miss),
        "embedding_cache_hit": _medians(hit),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_demo_latency.json").write_text(json.dumps(report, indent=2))
    table = _markdown(report)
    (args.out / "cpu_demo_latency.md").write_text(table)
    print(table)
    return 0


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _markdown(report: dict) -> str:
    lines = [f"Demo request latency, median of {report['repeats']} ({report['machine']}; {report['model']}; "
             f"{report['max_tokens']} generated tokens; {report['date']})", "",
             "| stage | cache miss (ms) | cache hit (ms) |", "|---|---:|---:|"]
    miss, hit = report["embedding_cache_miss"], report["embedding_cache_hit"]
    for key in KEYS:
        if key in miss or key in hit:
            fmt = lambda d: f"{d[key]:.2f}" if key in d else "–"  # noqa: E731
            lines.append(f"| {key} | {fmt(miss)} | {fmt(hit)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
