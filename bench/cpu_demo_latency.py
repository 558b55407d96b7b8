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


def _transformers_baseline(model_dir: pathlib.Path, image: bytes, max_tokens: int, repeats: int) -> dict[str, float]:
    """The same request in one process through transformers (no disaggregation): TTFT = generate
    with 1 new token, TPOT = (generate with max_tokens - TTFT) / (max_tokens - 1); medians."""
    import time

    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    content = [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)

    def timed(new_tokens: int) -> float:
        start = time.perf_counter()
        pil = Image.open(io.BytesIO(image)).convert("RGB")
        inputs = processor(images=[pil], text=text, return_tensors="pt")
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return (time.perf_counter() - start) * 1000.0

    for _ in range(3):
        timed(max_tokens)
    ttft = statistics.median(timed(1) for _ in range(repeats))
    total = statistics.median(timed(max_tokens) for _ in range(repeats))
    return {"ttft_ms": ttft, "tpot_ms": (total - ttft) / (max_tokens - 1), "total_ms": total}


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
    baseline = _transformers_baseline(model, _image(0), args.max_tokens, args.repeats)
    report = {
        "benchmark": "demo request latency breakdown (median ms)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {_cpu_count()} cores, device={args.device}",
        "model": str(model.name),
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "embedding_cache_miss": _medians(miss),
        "embedding_cache_hit": _medians(hit),
        "baseline_transformers_in_process": baseline,
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
             "| stage | E/P/D, cache miss (ms) | E/P/D, cache hit (ms) | transformers in one process (ms) |",
             "|---|---:|---:|---:|"]
    miss, hit = report["embedding_cache_miss"], report["embedding_cache_hit"]
    base = report["baseline_transformers_in_process"]
    for key in KEYS:
        if key in miss or key in hit:
            cells = [f"{d[key]:.2f}" if key in d else "–" for d in (miss, hit, base)]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
