"""End-to-end GPU benchmark: serving layouts on the same GPUs, on multimodal traces (issue 11).

Model: LLaVA-1.5-7B shapes (CLIP-ViT-L/14-336, 2-layer projector, Llama-2-7B-shaped decoder),
fp16, random weights (`bench/llava_checkpoint.py`); output lengths forced by the trace (EOS ignored).
Layouts, each a local deployment of real processes on this machine's GPU(s):
- separate:   encode, prefill and decode processes (E -> P -> D; prompts up to --local-prefill
              tokens may take E -> PD when the router predicts it sooner);
- colocated:  prefill --with-encode + decode (E+P colocated, D separate; same E -> PD rule);
- aggregated: one decode --with-encode process: it encodes, prefills and decodes every request;
or any replica counts ("E,P,D", E "+" for encode in the prefill replicas, "+,0,N" for N aggregated
replicas), spread over --gpus GPUs one process per GPU in turn (encode, prefill, then decode).
Workloads (`tuner.synth`, bursty arrivals, 20% image reuse): image-heavy (4-8 images per request),
mixed (shaped like the Azure LMM 2025 trace: most requests 0-2 images, up to 8), text-only.
For each layout, workload and rate (ascending; a workload stops after its first rate with
attainment under --stop-below) the trace is replayed open-loop after a discarded warm-up and
measured at the client: TTFT p50/p90/p99, TPOT p50/p90, throughput, SLO attainment (TTFT <= 2 s and
TPOT <= 100 ms per request; failed requests miss) and goodput (highest rate with >= 90%
attainment). Each (layout, workload) writes one JSON under --out; `--report` merges them into a
markdown table and PNG plots (goodput bars, TTFT CDFs).

    python bench/e2e.py --build-checkpoint /tmp/llava7b --out $OUT [--layouts "separate;colocated;aggregated"]
                        [--workloads image-heavy,text-only] [--rates image-heavy=1,2,3] [--duration 20]
    python bench/e2e.py --build-checkpoint /tmp/llava7b --gpus 4 --out $OUT \
                        --layouts "+,0,4;+,2,2;1,1,2;+,1,3"      # aggregated x4, E+P / D grids on 4 GPUs
    python bench/e2e.py --report docs/results/e2e-1gpu --out docs/results/e2e-1gpu
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYOUTS = ("separate", "colocated", "aggregated")
WORKLOADS = {
    "image-heavy": "images=1,images_mean=5,min_images=4,max_images=8,text_median=300,text_min=50,text_max=1000,"
                   "output_median=100,output_min=5,output_max=300",
    "mixed": "images=0.6,images_mean=1.5,max_images=8,text_median=600,text_min=100,text_max=3000,"
             "output_median=120,output_min=5,output_max=500",
    "text-only": "images=0,text_median=600,text_min=100,text_max=5000,output_median=120,output_min=5,output_max=500",
}
COMMON = "arrivals=bursty,burstiness=2,reuse=0.2,prefix=0.3,system_blocks=1,sizes=512x384:2|336x336:1"
DEFAULT_RATES = {"image-heavy": (1.0, 2.0, 4.0, 6.0), "mixed": (2.0, 4.0, 8.0, 12.0),
                 "text-only": (4.0, 8.0, 16.0)}
SLO_TTFT_S, SLO_TPOT_S, GOODPUT_ATTAINMENT = 2.0, 0.1, 0.9
KV_POOL = "24Gi"
METRICS = ("--metrics-port", "0")   # the replicas' cache counters are read after each workload


@dataclasses.dataclass(frozen=True)
class Point:
    """One replay: a workload at one rate on one layout, measured at the client."""
    rate_rps: float
    requests: int
    failed: int
    ttft_s: dict[str, float]
    tpot_s: dict[str, float]
    throughput_rps: float
    attainment: float
    ttfts: list[float]          # every completed request's TTFT (the CDF plots)
    errors: dict[str, int]      # failed requests by error (first 160 characters)
    timings_ms_mean: dict[str, float]  # the stages' own timings (the router's timings_ms), mean over requests


@dataclasses.dataclass(frozen=True)
class Layout:
    """Processes of one deployment: replicas per stage; encode_colocated: encode runs in the prefill
    replicas (or, with no prefill replica, in the decode replicas: aggregated)."""
    label: str
    encode: int
    prefill: int
    decode: int
    encode_colocated: bool = False

    @property
    def aggregated(self) -> bool:
        return self.encode_colocated and self.prefill == 0


NAMED_LAYOUTS = {"separate": "1,1,1", "colocated": "+,1,1", "aggregated": "+,0,1"}


def parse_layout(text: str) -> Layout:
    """"separate" | "colocated" | "aggregated" (one replica each), or "E,P,D" replica counts with
    E "+" for encode colocated ("+,2,2"; "+,0,4" = four aggregated replicas)."""
    e, p, d = NAMED_LAYOUTS.get(text, text).split(",")
    colocated = e.strip() == "+"
    layout = Layout(text, 0 if colocated else int(e), int(p), int(d), colocated)
    if text not in NAMED_LAYOUTS:
        encode = "E+" if colocated else f"E{layout.encode}"
        layout = dataclasses.replace(layout, label=f"{encode}P{layout.prefill}D{layout.decode}")
    return layout


def gpu_placement(layout: Layout, gpus: int) -> dict[str, int]:
    """Child name -> GPU index: encode, then prefill, then decode replicas, one GPU each in turn
    (round robin when there are more processes than GPUs)."""
    from epdserve.launcher import ClusterConfig

    names = ClusterConfig(model_dir=pathlib.Path("."), **_cluster_shape(layout)).names
    ordered = [name for stage in ("encode", "prefill", "decode") for name in names(stage)]
    return {name: i % max(1, gpus) for i, name in enumerate(ordered)}


def _cluster_shape(layout: Layout) -> dict:
    replicas = {"encode": layout.encode, "prefill": layout.prefill, "decode": layout.decode}
    return {"encode_colocated": layout.encode_colocated,
            "replicas": {k: v for k, v in replicas.items() if not (k == "encode" and layout.encode_colocated)}}


def cluster_config(layout: Layout, model_dir: pathlib.Path, local_prefill_tokens: int, device: str = "cuda",
                   extra: dict[str, tuple[str, ...]] | None = None, gpus: int = 1):
    from epdserve.launcher import ClusterConfig

    router = ("--local-prefill-tokens", str(local_prefill_tokens), "--request-timeout-s", "120")
    decode = ("--local-prefill-max-tokens", "8192", *METRICS)
    # a 7B prompt's KV is 0.5 MB per token (~2 GB at 4k tokens), published layer by layer until decode
    # takes it: the prefill's host pool holds several (the default 2 GiB holds one)
    prefill = (*(("--capacity-bytes", KV_POOL, "--preallocate-pool") if device == "cuda" else ()), *METRICS)
    stage_args = {"router": router, "decode": decode, "prefill": prefill}
    if device == "cuda":   # a stage's first replica is named like the stage: its flags go to every replica of
        # the stage, and each later replica's own flags come after them (the last of a flag wins)
        stage_args = _merged(stage_args, _per_gpu_args(layout, gpus))
    return ClusterConfig(model_dir=model_dir, device=device, dtype="float16" if device == "cuda" else "auto",
                         start_timeout_s=900, stage_args=_merged(stage_args, extra or {}), **_cluster_shape(layout))


def _per_gpu_args(layout: Layout, gpus: int) -> dict[str, tuple[str, ...]]:
    from epdserve.launcher import COLOCATED_DECODE_KV_FRACTION

    """Per replica: its GPU, and for a decode replica the share of that GPU's free memory its KV
    cache takes (most of it when alone there, less beside other processes' weights and activations)."""
    placement = gpu_placement(layout, gpus)
    processes = {gpu: sum(1 for g in placement.values() if g == gpu) for gpu in placement.values()}
    decodes = {gpu: sum(1 for n, g in placement.items() if g == gpu and n.startswith("decode")) for gpu in processes}
    args = {}
    for name, gpu in placement.items():
        args[name] = ("--device", f"cuda:{gpu}")
        if name.startswith("decode"):   # as LocalCluster shares one GPU: 0.4 among the decodes beside others
            share = 0.7 if processes[gpu] == 1 else COLOCATED_DECODE_KV_FRACTION / decodes[gpu]
            args[name] += ("--kv-cache-fraction", f"{share:.3f}")
    return args


def _merged(base: dict[str, tuple[str, ...]], extra: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return {stage: (*base.get(stage, ()), *extra.get(stage, ())) for stage in {*base, *extra}}


def _parse_extra(items) -> dict[str, tuple[str, ...]]:
    """--stage-args STAGE="--flag value ..." (repeatable) -> stage -> flags."""
    extra: dict[str, tuple[str, ...]] = {}
    for item in items or ():
        stage, _, flags = item.partition("=")
        extra[stage] = (*extra.get(stage, ()), *flags.split())
    return extra


def measure(trace, measured, rate: float) -> Point:
    """Client-side percentiles, throughput and SLO attainment of one replay."""
    import numpy as np

    ok = [m for m in measured if not m.error]
    ttft = np.array([m.ttft_s for m in ok])
    tpot = np.array([m.tpot_s for m in ok if not math.isnan(m.tpot_s)])
    start = min(r.arrival_s for r in trace)
    ends = [r.arrival_s + m.e2e_s for r, m in zip(sorted(trace, key=lambda r: r.arrival_s), measured) if not m.error]
    span = (max(ends) - start) if ends else math.inf
    met = sum(1 for m in ok if m.ttft_s <= SLO_TTFT_S and (math.isnan(m.tpot_s) or m.tpot_s <= SLO_TPOT_S))

    def pct(values, qs):
        return {f"p{q}": float(np.percentile(values, q)) if len(values) else math.inf for q in qs}

    errors: dict[str, int] = {}
    for m in measured:
        if m.error:
            errors[m.error[:160]] = errors.get(m.error[:160], 0) + 1
    keys = sorted({k for m in ok for k in m.timings})
    timings = {k: float(np.mean([m.timings[k] for m in ok if k in m.timings])) for k in keys}
    return Point(rate, len(measured), len(measured) - len(ok), pct(ttft, (50, 90, 99)), pct(tpot, (50, 90)),
                 len(ok) / span if span > 0 else 0.0, met / len(measured), sorted(float(t) for t in ttft), errors,
                 timings)


async def run_workload(address: str, workload: str, rates, duration_s: float, warmup: int, stop_below: float,
                       seed: int) -> list[Point]:
    from epdserve.sdk import AsyncClient
    from tuner.live import PromptMaker, replay, warm_up
    from tuner.synth import parse_spec, synthesize

    points = []
    async with AsyncClient(address, timeout_s=150) as client:
        prompts = PromptMaker()
        await prompts.calibrate(client)
        for i, rate in enumerate(rates):
            requests = max(10, round(rate * duration_s))
            spec = f"{WORKLOADS[workload]},{COMMON},rate={rate},requests={requests},seed={seed}"
            trace = synthesize(parse_spec(spec))
            if i == 0:
                await warm_up(client, trace, prompts, warmup)
            prompts = PromptMaker(prompts.chars_per_token)   # a fresh salt: cold caches for every replay
            started = time.perf_counter()
            point = measure(trace, await replay(client, trace, prompts), rate)
            points.append(point)
            print(json.dumps({"workload": workload, "rate": rate, "requests": point.requests, "failed": point.failed,
                              "ttft_p90_ms": round(point.ttft_s["p90"] * 1000, 1),
                              "tpot_p90_ms": round(point.tpot_s["p90"] * 1000, 1),
                              "throughput_rps": round(point.throughput_rps, 2),
                              "attainment": round(point.attainment, 3),
                              "wall_s": round(time.perf_counter() - started, 1), "errors": point.errors}), flush=True)
            if point.attainment < stop_below:
                break
    return points


def cache_counters(cluster) -> dict[str, dict[str, float]]:
    """The prefill and decode replicas' mmcache counters so far: reads whose in-place bytes failed
    verification, bytes read in place and from other owners' data channels (a hand-off that
    should stay on this host)."""
    names = ("epdserve_cache_corrupt_total", "epdserve_cache_read_local_bytes_total",
             "epdserve_cache_read_remote_bytes_total")
    counters = {}
    for name in cluster.children:
        if name.startswith(("prefill", "decode")):
            samples = cluster.scrape_metrics(name)
            counters[name] = {metric: samples.value(metric) for metric in names}
    return counters


def goodput(points) -> float:
    """Highest measured rate with >= 90% attainment (0 if none)."""
    return max((p["rate_rps"] for p in points if p["attainment"] >= GOODPUT_ATTAINMENT), default=0.0)


def _environment(commit_override: str = "") -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    cuda = torch.cuda.is_available()
    return {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
            "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "commit": commit_override or commit.stdout.strip() or "unknown"}


def run(args) -> int:
    from epdserve.launcher import LocalCluster

    model_dir = pathlib.Path(args.model) if args.model else None
    if args.build_checkpoint and not (pathlib.Path(args.build_checkpoint) / "config.json").exists():
        from bench.llava_checkpoint import build

        started = time.perf_counter()
        build(pathlib.Path(args.build_checkpoint))
        print(f"checkpoint built in {time.perf_counter() - started:.0f} s", flush=True)
    model_dir = model_dir or pathlib.Path(args.build_checkpoint)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rates = {**DEFAULT_RATES, **_parse_rates(args.rates)}
    for layout in (parse_layout(text) for text in args.layouts.split(";")):
        started = time.perf_counter()
        extra = _parse_extra(args.stage_args)
        config = cluster_config(layout, model_dir, args.local_prefill_tokens, args.device, extra, args.gpus)
        with LocalCluster(config) as cluster:
            print(f"{layout.label}: up in {time.perf_counter() - started:.0f} s", flush=True)
            for workload in args.workloads.split(","):
                points = asyncio.run(run_workload(cluster.router_address, workload, rates[workload], args.duration,
                                                  args.warmup, args.stop_below, args.seed))
                result = {**_environment(args.commit), "layout": layout.label, "gpus_used": args.gpus,
                          "replicas": dataclasses.asdict(layout), "workload": workload, "stage_args": extra,
                          "spec": f"{WORKLOADS[workload]},{COMMON}", "duration_s": args.duration,
                          "slo": {"ttft_s": SLO_TTFT_S, "tpot_s": SLO_TPOT_S},
                          "points": [dataclasses.asdict(p) for p in points]}
                result["goodput_rps"] = goodput(result["points"])
                result["cache_counters"] = cache_counters(cluster)
                (out / f"e2e-{layout.label}-{workload}.json").write_text(json.dumps(result, indent=1) + "\n")
                # the services' own account (failures, a hand-off that left shared memory)
                logs = {name: cluster.log_tail(name, 100) for name in cluster.children}
                (out / f"e2e-{layout.label}-{workload}-logs.json").write_text(json.dumps(logs, indent=1))
    return 0


def _parse_rates(items) -> dict[str, tuple[float, ...]]:
    rates = {}
    for item in items or ():
        workload, _, values = item.partition("=")
        if workload not in WORKLOADS:
            raise SystemExit(f"--rates: unknown workload {workload!r} (one of {', '.join(WORKLOADS)})")
        rates[workload] = tuple(float(v) for v in values.split(","))
    return rates


def report(folder: pathlib.Path, out: pathlib.Path) -> int:
    """Merge the per-(layout, workload) JSONs: one markdown table, goodput bars, TTFT CDFs."""
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("e2e-*-*.json")) if "-logs" not in p.name]
    if not results:
        raise SystemExit(f"no e2e-*.json under {folder}")
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"E2E on {results[0]['gpus']}x {results[0]['gpu']} ({results[0]['date']}, commit {results[0]['commit']}); "
             f"SLO: TTFT <= {SLO_TTFT_S:g} s and TPOT <= {SLO_TPOT_S * 1000:g} ms per request", "",
             "| workload | layout | rate (req/s) | requests | failed | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 (ms) "
             "| throughput (req/s) | attainment |", "|---|---|---:|---:|---:|---|---|---:|---:|"]
    layouts = _layout_order(results)
    for r in sorted(results, key=lambda r: (r["workload"], layouts.index(r["layout"]))):
        for p in r["points"]:
            t, o = p["ttft_s"], p["tpot_s"]
            lines.append(f"| {r['workload']} | {r['layout']} | {p['rate_rps']:g} | {p['requests']} | {p['failed']} | "
                         f"{t['p50'] * 1e3:.0f} / {t['p90'] * 1e3:.0f} / {t['p99'] * 1e3:.0f} | "
                         f"{o['p50'] * 1e3:.1f} / {o['p90'] * 1e3:.1f} | {p['throughput_rps']:.2f} | "
                         f"{p['attainment']:.2f} |")
    lines += ["", "| workload | " + " | ".join(f"{layout} goodput" for layout in layouts) + " |",
              "|---|" + "---:|" * len(layouts)]
    by = {(r["workload"], r["layout"]): _goodput_text(r) for r in results}
    for workload in sorted({r["workload"] for r in results}):
        lines.append(f"| {workload} | " + " | ".join(by.get((workload, layout), "-") for layout in layouts) + " |")
    (out / "e2e.md").write_text("\n".join(lines) + "\n")
    _plots(results, out, layouts)
    print("\n".join(lines))
    return 0


def _goodput_text(result: dict) -> str:
    """The goodput, or "< r" when even the lowest measured rate r missed 90% attainment."""
    if result["goodput_rps"] > 0 or not result["points"]:
        return f"{result['goodput_rps']:g}"
    return f"< {min(p['rate_rps'] for p in result['points']):g}"


def _layout_order(results) -> list[str]:
    """The named layouts first (separate, colocated, aggregated), then the others as they come."""
    seen = list(dict.fromkeys(r["layout"] for r in results))
    return [name for name in LAYOUTS if name in seen] + [name for name in seen if name not in LAYOUTS]


def _plots(results, out: pathlib.Path, layouts: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({r["workload"] for r in results})
    by = {(r["workload"], r["layout"]): r for r in results}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(layouts)
    for i, layout in enumerate(layouts):
        ax.bar([w + i * width for w in range(len(workloads))],
               [by[(w, layout)]["goodput_rps"] if (w, layout) in by else 0 for w in workloads], width, label=layout)
    ax.set_xticks([w + width for w in range(len(workloads))], workloads)
    ax.set_ylabel("goodput (req/s, >= 90% attainment)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "e2e-goodput.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(workloads), figsize=(4 * len(workloads), 3.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        for layout in layouts:
            if (workload, layout) in by and by[(workload, layout)]["points"]:
                point = by[(workload, layout)]["points"][0]
                values = point["ttfts"]
                ax.plot([v * 1000 for v in values], [(i + 1) / len(values) for i in range(len(values))],
                        label=f"{layout} @ {point['rate_rps']:g}/s")
        ax.set_title(workload)
        ax.set_xlabel("TTFT (ms)")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fraction of requests")
    fig.tight_layout()
    fig.savefig(out / "e2e-ttft-cdf.png", dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="LLaVA checkpoint directory")
    parser.add_argument("--build-checkpoint", default="", help="build the 7B-shaped random checkpoint here first")
    parser.add_argument("--layouts", default=";".join(LAYOUTS),
                        help="';'-separated: separate | colocated | aggregated | E,P,D replica counts (E '+': encode "
                             "in the prefill replicas; '+,0,N': N aggregated replicas)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs to spread the replicas over (cuda:0..N-1)")
    parser.add_argument("--workloads", default="image-heavy,text-only")
    parser.add_argument("--rates", action="append", help="WORKLOAD=r1,r2,... ascending (repeatable)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per replay")
    parser.add_argument("--warmup", type=int, default=16, help="discarded requests before a workload's replays")
    parser.add_argument("--stop-below", type=float, default=0.5, help="stop a workload's rates under this attainment")
    parser.add_argument("--local-prefill-tokens", type=int, default=1024,
                        help="separate / colocated: prompts this short may take E -> PD")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda", help="cuda | cpu (a smoke test on the tiny model)")
    parser.add_argument("--stage-args", action="append", help='STAGE="--flag value ..." more flags for a stage '
                        "(encode, prefill, decode, router); repeatable")
    parser.add_argument("--commit", default="", help="the commit being measured, when the tree's git metadata "
                        "is not it (a device runs a copy of the working tree)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--report", default="", help="merge the JSONs in this folder instead of running")
    args = parser.parse_args()
    if args.report:
        return report(pathlib.Path(args.report), pathlib.Path(args.out))
    if not args.model and not args.build_checkpoint:
        parser.error("give --model or --build-checkpoint")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
