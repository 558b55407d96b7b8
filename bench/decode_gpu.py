"""Decode-stage GPU benchmark (issue: decode): Llama-3-8B shapes, bf16, random weights.

Both paths share one set of weights (our decoder aliases the HF model's tensors):
- HF `transformers` LlamaForCausalLM (SDPA) decode loop with a DynamicCache: prefill the batch,
  then time greedy one-token steps (forward with explicit position ids, argmax, no other work).
- epdserve's decode engine (services.decode.engine.DecodeEngine): paged KV, continuous batching,
  the step the service runs (plan, batched model step, paged attention, sampling, bookkeeping).
  The prompts' KV is random (decode time does not depend on its values) and admitted through the
  engine's normal path.
The HBM limit of a step is (weight bytes + KV bytes read) / the device copy bandwidth measured in
the same run; pinned host->device bandwidth is measured too.

    python bench/decode_gpu.py --out docs/results/decode-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 1 << 30


def device_copy_bandwidth(gib: float = 4.0) -> float:
    """Bytes/s moved by a device-to-device copy (read + write both counted)."""
    src = torch.empty(int(gib * GIB) // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = _timed_cuda(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 2 / seconds


def pinned_h2d_bandwidth(gib: float = 2.0) -> float:
    src = torch.empty(int(gib * GIB), dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    dst.copy_(src, non_blocking=True)
    return src.numel() / _timed_cuda(lambda: dst.copy_(src, non_blocking=True), 5)


def _timed_cuda(fn, repeats: int) -> float:
    """Median seconds of fn() (CUDA events)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(times)


def hf_step_seconds(hf, batch: int, context: int, steps: int) -> float:
    """Seconds per greedy decode step of HF with a DynamicCache holding `context` prompt tokens."""
    from transformers import DynamicCache

    ids = torch.randint(0, 128000, (batch, context), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.inference_mode():
        cache = DynamicCache()
        out = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        del out, ids
        times = []
        for step in range(steps + 3):
            positions = torch.full((batch, 1), context + step, device="cuda")
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = hf(input_ids=token, past_key_values=cache, position_ids=positions, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            token.tolist()
            times.append(time.perf_counter() - start)
    del cache
    torch.cuda.empty_cache()
    return statistics.median(times[3:])


def engine_for(ours, batch: int, context: int, steps: int, kv_gib: float, graphs: bool):
    from epdserve.config import DecodeConfig
    from services.decode.setup import build_engine

    config = DecodeConfig(max_running=max(batch, 1), max_context=context + steps + 8, block_size=16,
                          kv_cache_gib=kv_gib, cuda_graphs=graphs)
    return build_engine(ours, config)


def engine_step_seconds(ours, batch: int, context: int, steps: int, kv_gib: float, graphs: bool = True) -> float:
    """Seconds per DecodeEngine.step with `batch` sequences of `context` prompt rows."""
    from epdserve.engine.sampler import SamplingParams
    from services.decode.engine import DecodeJob

    engine = engine_for(ours, batch, context, steps, kv_gib, graphs)
    spec = ours.spec
    layer = torch.randn(2, spec.num_kv_heads, context, spec.head_dim, dtype=torch.bfloat16, device="cuda")
    greedy = SamplingParams(temperature=0.0)
    jobs = [DecodeJob(f"r{i}", [layer] * spec.num_layers, context, 1, steps + 4, greedy) for i in range(batch)]
    engine.step(jobs)
    del layer, jobs
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = engine.step()
        times.append(time.perf_counter() - start)
        assert result.batch_size == batch
    del engine
    torch.cuda.empty_cache()
    return statistics.median(times[2:])


def kv_bytes_per_token(spec) -> int:
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results" / "decode-gpu.json")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cases", nargs="*", default=["1x4096", "8x4096", "32x4096", "1x32768", "1x131072"],
                        help="BATCHxCONTEXT")
    parser.add_argument("--kv-gib", type=float, default=40.0)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    from bench.prefill_gpu import build_models

    hf, ours = build_models(args.layers)
    weights = sum(p.numel() * p.element_size() for p in ours.parameters())
    report = {"benchmark": "decode stage", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "model": f"Llama-3-8B shapes ({args.layers} layers), bf16, random weights", "weights_gib": weights / GIB,
              "device_copy_gb_s": device_copy_bandwidth() / 1e9, "pinned_h2d_gb_s": pinned_h2d_bandwidth() / 1e9,
              "rows": []}
    print(report, flush=True)
    for case in args.cases:
        batch, context = (int(x) for x in case.split("x"))
        row = {"batch": batch, "context": context}
        row["ours_step_ms"] = engine_step_seconds(ours, batch, context, args.steps, args.kv_gib) * 1000
        row["ours_eager_step_ms"] = engine_step_seconds(ours, batch, context, args.steps, args.kv_gib, False) * 1000
        if not args.skip_hf:
            row["hf_step_ms"] = hf_step_seconds(hf, batch, context, args.steps) * 1000
        step_bytes = weights + batch * context * kv_bytes_per_token(ours.spec)
        row["hbm_limit_ms"] = step_bytes / (report["device_copy_gb_s"] * 1e9) * 1000
        print(row, flush=True)
        report["rows"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"Decode on {report['device']} ({report['model']}), {report['date'][:10]}; weights "
             f"{report['weights_gib']:.2f} GiB; device copy {report['device_copy_gb_s']:.0f} GB/s, pinned H2D "
             f"{report['pinned_h2d_gb_s']:.1f} GB/s", "",
             "| batch | context | HF step (ms) | HF tok/s | epdserve step (ms) | epdserve tok/s | speed-up | "
             "eager step (ms) | HBM limit (ms) | step / limit |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        hf = r.get("hf_step_ms")
        ours = r["ours_step_ms"]
        lines.append(f"| {r['batch']} | {r['context']} | {hf or float('nan'):.1f} | "
                     f"{(r['batch'] * 1000 / hf) if hf else float('nan'):.0f} | {ours:.1f} | "
                     f"{r['batch'] * 1000 / ours:.0f} | {(hf / ours) if hf else float('nan'):.2f} | "
                     f"{r['ours_eager_step_ms']:.1f} | {r['hbm_limit_ms']:.1f} | {ours / r['hbm_limit_ms']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
