"""MoE expert offloading benchmark (ProMoE, ALGORITHMS.md §6): Mixtral-8x7B shapes, bf16, random weights.

Batch-1 decode tokens/s (--new steps after a --prompt-token prompt; --warmup steps excluded) of one
decoder built directly in memory (no checkpoint on disk), depth cut to --layers:
- resident:      every expert on the GPU (MixtralMoE);
- on_demand:     experts in pinned host memory, per-layer LRU cache at --cache-rate, a missing expert
                 fetched when its turn comes (gate order), no prediction;
- reorder:       ProMoE without a predictor (reordered inference, gate-time precise fetch) as ablation;
- skip_gate_dN:  ProMoE with the skip-gate predictor at distance N (--distances, default 1 2).
Decoding feeds fixed random tokens (--feed random, the default): with random weights greedy decoding
soon repeats one token, so every path would route the same way each step and always hit its cache.
Each step's argmax is still compared with the resident path. Reports hit rate, GoodPred (accuracy x
fetch rate), stall time, bytes copied per token, and the pinned host->device bandwidth measured in
the same run.

    python bench/moe_gpu.py --out docs/results/moe-h200.json       # 16 layers: 42 GiB of experts
    python bench/moe_gpu.py --smoke --out /tmp/moe_smoke.json       # CPU, tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    ffn: int = 14336
    experts: int = 8
    top_k: int = 2
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000
    layers: int = 16


SMOKE = Shape(hidden=64, ffn=128, experts=8, top_k=2, heads=4, kv_heads=2, vocab=256, layers=4)


def mixtral_config(shape: Shape):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, num_local_experts=shape.experts,
                         num_experts_per_tok=shape.top_k, max_position_embeddings=32768, sliding_window=None,
                         tie_word_embeddings=False)


def build_decoder(shape: Shape, device: torch.device, dtype: torch.dtype):
    """A Mixtral-shaped epdserve Decoder with N(0, 0.02) weights (norms 1), allocated on `device`."""
    from epdserve.models.decoder import Decoder
    from epdserve.models.layers import RotaryEmbedding
    from epdserve.models.spec import _decoder_spec

    config = mixtral_config(shape)
    spec = _decoder_spec(config, (2,))
    rope = RotaryEmbedding.from_hf_config(config, spec.head_dim, spec.rope_type).to(device)
    with torch.device("meta"):
        decoder = Decoder(spec, rope)
    decoder = decoder.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in decoder.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02, generator=gen)
    return decoder.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_to_device_bandwidth(device: torch.device, gib: float) -> float:
    """Bytes/s of a copy from page-locked host memory (registered as HostExperts pins it) to the
    device; on the CPU, of a plain host copy. Median of 5."""
    from epdserve.engine.expert_memory import HostExperts

    src = torch.empty((1, 3, int(gib * GIB) // 6), dtype=torch.bfloat16)
    host = HostExperts([src], 1, src.shape[2])
    if device.type == "cuda":
        host.pin()
    dst = torch.empty_like(src, device=device)
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return src.numel() * src.element_size() / statistics.median(times[1:])


@torch.inference_mode()
def decode_run(decoder, prompt: torch.Tensor, feed: torch.Tensor | None, steps: int, warmup: int,
               offloader=None) -> dict:
    """Prefill `prompt`, then `warmup` + `steps` one-token steps fed from `feed` (greedy when None).
    Times the last `steps` steps; stats are reset after the warm-up."""
    from epdserve.engine.generation import decode_one, new_kv, prefill

    device = decoder.device
    kv = new_kv(decoder, prompt.numel() + warmup + steps + 1)
    sync(device)
    start = time.perf_counter()
    logits = prefill(decoder, decoder.embed(prompt.to(device)[None])[0], kv)
    choices = [int(logits.argmax())]
    prefill_s = time.perf_counter() - start
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            if offloader is not None:
                offloader.reset_stats()
            start = time.perf_counter()
        token = choices[-1] if feed is None else int(feed[i])
        choices.append(int(decode_one(decoder, token, kv).argmax()))
    sync(device)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": steps / seconds, "ms_per_token": seconds / steps * 1000, "prefill_s": prefill_s,
            "argmax": choices}


def summarize(run: dict, stats, steps: int, reference: list[int]) -> dict:
    """One table row from a decode run and the offloader's stats over the timed steps."""
    row = {k: v for k, v in run.items() if k != "argmax"}
    row["argmax_match"] = sum(a == b for a, b in zip(run["argmax"], reference))
    row["argmax_total"] = len(reference)
    if stats is not None:
        row.update(hit_rate=stats.hit_rate, accuracy=stats.accuracy, fetch_rate=stats.fetch_rate,
                   good_pred=stats.good_pred, stall_ms_per_token=stats.stall_seconds / steps * 1000,
                   on_demand_per_token=stats.on_demand / steps, bytes_per_token=stats.bytes_copied / steps,
                   copy_gb_s=stats.bytes_copied / stats.copy_seconds / 1e9 if stats.copy_seconds else None,
                   stats=stats.as_dict())
    return row


def offload_cases(args) -> list[tuple[str, object]]:
    from epdserve.engine.expert_offload import ExpertOffloadConfig

    rate = args.cache_rate
    cases = [("on_demand", ExpertOffloadConfig(cache_rate=rate, predictor="none", enable_prefetch=False)),
             ("reorder", ExpertOffloadConfig(cache_rate=rate, predictor="none"))]
    cases += [(f"skip_gate_d{d}", ExpertOffloadConfig(cache_rate=rate, predictor="skip_gate", prefetch_distance=d))
              for d in args.distances]
    return cases


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_all(args, shape: Shape, device: torch.device, dtype: torch.dtype, report: dict) -> None:
    from epdserve.engine.expert_offload import offload_experts

    decoder = build_decoder(shape, device, dtype)
    report["weights_gib"] = sum(p.numel() * p.element_size() for p in decoder.parameters()) / GIB
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, shape.vocab, (args.prompt,), generator=gen)
    feed = torch.randint(0, shape.vocab, (args.warmup + args.new,), generator=gen) if args.feed == "random" else None
    reset_peak(device)
    resident = decode_run(decoder, prompt, feed, args.new, args.warmup)
    reference = resident["argmax"]
    report["rows"].append({"name": "resident", **summarize(resident, None, args.new, reference),
                           "peak_gpu_gib": peak_gib(device)})
    print(report["rows"][-1], flush=True)
    host = None
    for name, config in offload_cases(args):
        offloader = offload_experts(decoder, config, host=host)
        host = offloader.host
        reset_peak(device)
        try:
            run = decode_run(decoder, prompt, feed, args.new, args.warmup, offloader)
            row = {"name": name, **summarize(run, offloader.stats(), args.new, reference),
                   "peak_gpu_gib": peak_gib(device), "capacity_per_layer": offloader.capacity,
                   "region_gib": offloader.slots.region.numel() * offloader.slots.region.element_size() / GIB}
        finally:
            offloader.close()
            del offloader
        report["rows"].append(row)
        report["pinned_host_gib"] = host.nbytes / GIB
        print({k: v for k, v in row.items() if k != "stats"}, flush=True)
        write(args.out, report)


def write(path: pathlib.Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results" / "moe-gpu.json")
    parser.add_argument("--layers", type=int, default=16, help="decoder depth (Mixtral-8x7B has 32)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=8, help="decode steps before timing")
    parser.add_argument("--cache-rate", type=float, default=0.25, help="fraction of experts resident on the GPU")
    parser.add_argument("--distances", type=int, nargs="*", default=[1, 2], help="skip-gate prefetch distances")
    parser.add_argument("--feed", choices=("random", "greedy"), default="random",
                        help="decode input: fixed random tokens, or each step's argmax")
    parser.add_argument("--bandwidth-gib", type=float, default=2.0, help="buffer size of the H2D measurement")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, float32: checks the script only")
    args = parser.parse_args()
    if args.smoke:
        args.prompt, args.new, args.warmup, args.bandwidth_gib = min(args.prompt, 32), min(args.new, 8), 2, 0.01
        shape, device, dtype = SMOKE, torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (use --smoke on a CPU)")
        shape, device, dtype = dataclasses.replace(Shape(), layers=args.layers), torch.device("cuda", 0), torch.bfloat16
    report = {"benchmark": "MoE expert offloading (ProMoE)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "model": f"Mixtral-8x7B shapes ({shape.layers} layers), {str(dtype).removeprefix('torch.')}, "
                       f"random weights" + (" [smoke: tiny shapes]" if args.smoke else ""),
              "shape": dataclasses.asdict(shape), "prompt": args.prompt, "new": args.new, "warmup": args.warmup,
              "cache_rate": args.cache_rate, "feed": args.feed,
              "h2d_gb_s": host_to_device_bandwidth(device, args.bandwidth_gib) / 1e9, "rows": []}
    print({k: v for k, v in report.items() if k != "rows"}, flush=True)
    run_all(args, shape, device, dtype, report)
    write(args.out, report)
    print(markdown(report))
    return 0


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    resident = report["rows"][0]["tokens_per_s"]
    lines = [f"MoE offloading on {report['device']} ({report['model']}), {report['date'][:10]}; prompt "
             f"{report['prompt']}, {report['new']} timed decode steps (feed: {report['feed']}); cache rate "
             f"{report['cache_rate']}; weights {report['weights_gib']:.1f} GiB, pinned host experts "
             f"{report.get('pinned_host_gib', 0):.1f} GiB; pinned H2D {report['h2d_gb_s']:.1f} GB/s", "",
             "| path | tok/s | ms/token | / resident | hit rate | accuracy | fetch rate | GoodPred | "
             "stall ms/token | on-demand/token | MB copied/token | copy GB/s | argmax = resident | peak GPU GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        mb = None if r.get("bytes_per_token") is None else r["bytes_per_token"] / 1e6
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.1f} | "
                     f"{r['tokens_per_s'] / resident:.3f} | {_fmt(r.get('hit_rate'), '.2f')} | "
                     f"{_fmt(r.get('accuracy'), '.2f')} | {_fmt(r.get('fetch_rate'), '.2f')} | "
                     f"{_fmt(r.get('good_pred'), '.2f')} | {_fmt(r.get('stall_ms_per_token'), '.1f')} | "
                     f"{_fmt(r.get('on_demand_per_token'), '.2f')} | {_fmt(mb, '.0f')} | "
                     f"{_fmt(r.get('copy_gb_s'), '.1f')} | {r['argmax_match']}/{r['argmax_total']} | "
                     f"{_fmt(r.get('peak_gpu_gib'), '.1f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
