"""Tuner accuracy: does the simulator predict what a live local deployment does?

Profiles a local E1/P1/D1 deployment of the tiny model (`tuner profile`'s sweep), then for each
configuration (replicas per stage, started as real local processes) and each request rate replays
a synthetic multimodal trace open-loop against it (`tuner validate`'s replay) and compares the
measured client-side percentiles with the simulator's prediction for the same trace, configuration
and profile. Writes JSON and a markdown table.

With `--rounds R` the whole procedure runs R times in turn (a fresh profile, then every
configuration and rate with requests/R requests of a trace seeded seed + round), and each row pools
its rounds: on a shared machine whose speed drifts by tens of percent over minutes, a configuration
measured only early or only late would otherwise be compared with a profile taken at another speed.

    python bench/tuner_accuracy.py [--configs "1,1,1;1,2,1;2,1,2;+,1,1"] [--rates 2,6] [--requests 200]
                                   [--rounds 3] [--out bench/results]
    python bench/tuner_accuracy.py --pool-from A/tuner-accuracy-samples.jsonl B/tuner-accuracy-samples.jsonl
                                   [--out bench/results]

Every replay is written as it finishes (`tuner-accuracy-samples.jsonl` and `samples/`, beside the
round's profile), so a run cut short keeps what it measured, and `--pool-from` re-pools saved
replays (several runs' too: e.g. configurations split over calls with a time limit), re-simulating
each with its round's profile and seed.

A configuration is E,P,D replica counts; E "+" means encode colocated in the prefill replicas
(prefill --with-encode, router --encode-colocated).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPEC = ("requests={requests},rate={rate},text_median=200,text_max=900,output_median=24,output_max=96,"
        "sizes=224x224|448x336,prefix=0.3,system_blocks=1,seed={seed}")
REPORTED = (("ttft", "p50"), ("ttft", "p90"), ("ttft", "p99"), ("tpot", "mean"), ("e2e", "p50"), ("e2e", "p90"))


def _cluster(model_dir, candidate):
    from epdserve.launcher import ClusterConfig, LocalCluster

    stages = {"encode": candidate.encode_replicas, "prefill": candidate.prefill_replicas,
              "decode": candidate.decode_replicas}
    return LocalCluster(ClusterConfig(model_dir=model_dir, replicas=stages,
                                      encode_colocated=candidate.encode_colocated))


def parse_config(text: str):
    """"E,P,D" -> the Candidate with those replicas; E "+" = encode colocated in the prefill replicas."""
    from tuner.sim import Candidate

    e, p, d = text.split(",")
    if e.strip() == "+":
        return Candidate(0, int(p), int(d), encode_colocated=True)
    return Candidate(int(e), int(p), int(d))


async def _profile(address: str, cores: int, repeats: int, processes: int):
    from epdserve.sdk import AsyncClient
    from tuner.profiler import Deployment, Profiler, SweepConfig

    async with AsyncClient(address) as client:
        deployment = Deployment(host_cores=cores, measured_on=f"{cores}-core CPU ({platform.processor() or 'x86_64'})",
                                processes=processes)
        return await Profiler(client, SweepConfig(repeats=repeats)).run(deployment)


async def _replay(address: str, trace, warmup: int):
    from epdserve.sdk import AsyncClient
    from tuner.live import PromptMaker, replay, warm_up

    async with AsyncClient(address) as client:
        prompts = PromptMaker()
        await prompts.calibrate(client)
        await warm_up(client, trace, prompts, warmup)
        return await replay(client, trace, prompts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="1,1,1;1,2,1;2,1,2", help="E,P,D replicas; ';'-separated")
    parser.add_argument("--rates", default="2,6", help="request rates (req/s), comma-separated")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=4, help="profile samples per sweep point")
    parser.add_argument("--warmup", type=int, default=40, help="requests served before each replay, not measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleave: each round profiles afresh, then replays requests/rounds requests per "
                             "configuration and rate (seed + round); the rounds are pooled, so a machine whose "
                             "speed drifts over minutes weighs on every configuration alike")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--pool-from", nargs="+", default=(), metavar="SAMPLES_JSONL",
                        help="measure nothing: pool the replays these runs saved")
    args = parser.parse_args()
    if args.pool_from:
        pooled, hardware = _saved_samples(args.pool_from)
        return _report(pathlib.Path(args.out), pooled, max(len(s) for s in pooled.values()), hardware)

    from epdserve.env import read_env
    from epdserve.models.tiny import cached_tiny_checkpoint
    configs = [parse_config(item) for item in args.configs.split(";")]
    rates = [float(x) for x in args.rates.split(",")]
    cores = len(os.sched_getaffinity(0))
    model_dir = cached_tiny_checkpoint(read_env().cache_dir)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    hardware = f"{cores}-core CPU, {platform.platform()}"
    (out / "tuner-accuracy-samples.jsonl").unlink(missing_ok=True)   # this run's replays only
    pooled: dict[tuple[str, float], list] = {}
    for round_ in range(args.rounds):
        profile = _profile_deployment(model_dir, cores, args.repeats)
        name = "tuner-accuracy-profile.json" if round_ == 0 else f"tuner-accuracy-profile-round{round_}.json"
        profile.save(out / name)
        for candidate in configs:
            for rate, sample in _measure(model_dir, candidate, rates, profile, args, round_):
                pooled.setdefault((candidate.label(), rate), []).append(sample)
                _save_sample(out, name, hardware, candidate, rate, round_, args.seed + round_, sample)
    return _report(out, pooled, args.rounds, hardware)


def _report(out: pathlib.Path, pooled: dict, rounds: int, hardware: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rows = [_row(label, rate, samples) for (label, rate), samples in pooled.items()]
    first = next(iter(pooled.values()))[0]
    profile = first[4]
    speed = _simulator_speed(profile)
    result = {"date": datetime.date.today().isoformat(), "hardware": hardware,
              "model": profile.model, "idle_cores_per_process": profile.idle_cores_per_process, "spec": SPEC,
              "rounds": rounds, "requests_per_round": len(first[0]),
              "rows": rows, "simulator_configs_per_s_1000_requests": speed}
    (out / "tuner-accuracy.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "tuner-accuracy.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _save_sample(out: pathlib.Path, profile_name: str, hardware: str, candidate, rate: float, round_: int,
                 seed: int, sample) -> None:
    """Append one replay (its trace and measurements, exactly) to the run's samples."""
    import dataclasses

    trace, _, measured, *_ = sample
    (out / "samples").mkdir(exist_ok=True)
    name = f"samples/{candidate.label()}-{rate:g}rps-round{round_}.json"
    (out / name).write_text(json.dumps({"trace": [dataclasses.asdict(r) for r in trace],
                                        "measured": [dataclasses.asdict(m) for m in measured]}))
    line = {"config": _config_text(candidate), "rate": rate, "round": round_, "seed": seed, "profile": profile_name,
            "replay": name, "hardware": hardware}
    with open(out / "tuner-accuracy-samples.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def _config_text(candidate) -> str:
    encode = "+" if candidate.encode_colocated else str(candidate.encode_replicas)
    return f"{encode},{candidate.prefill_replicas},{candidate.decode_replicas}"


def _saved_samples(paths) -> tuple[dict[tuple[str, float], list], str]:
    """Saved replays, re-simulated with their round's profile and seed, grouped as a run groups
    them; and the hardware they were measured on."""
    from tuner.live import Measured
    from tuner.profile import Profile
    from tuner.sim import simulate
    from tuner.traces import TraceImage, TraceRequest

    pooled: dict[tuple[str, float], list] = {}
    hardware: set[str] = set()
    for path in map(pathlib.Path, paths):
        for line in path.read_text().splitlines():
            saved = json.loads(line)
            replay = json.loads((path.parent / saved["replay"]).read_text())
            trace = [TraceRequest(**{**r, "prefix_blocks": tuple(r["prefix_blocks"]),
                                     "images": tuple(TraceImage(**i) for i in r["images"])}) for r in replay["trace"]]
            measured = [Measured(**m) for m in replay["measured"]]
            profile, candidate = Profile.load(path.parent / saved["profile"]), parse_config(saved["config"])
            started = time.perf_counter()
            predicted = simulate(trace, profile, candidate, seed=saved["seed"])
            sample = (trace, predicted, measured, time.perf_counter() - started, profile)
            pooled.setdefault((candidate.label(), saved["rate"]), []).append(sample)
            hardware.add(saved["hardware"])
    if not pooled:
        raise SystemExit(f"--pool-from: no saved replays in {', '.join(map(str, paths))}")
    return pooled, "; ".join(sorted(hardware))


def _profile_deployment(model_dir, cores: int, repeats: int):
    """Profile a fresh local E1P1D1 deployment."""
    from tuner.sim import Candidate

    profiled = Candidate(1, 1, 1)
    cluster = _cluster(model_dir, profiled)
    try:
        started = time.perf_counter()
        profile = asyncio.run(_profile(cluster.start(), cores, repeats, profiled.processes()))
        print(f"profiled in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        cluster.stop()
    return profile


def _measure(model_dir, candidate, rates, profile, args, round_: int):
    """One round of one configuration: per rate, (rate, (trace, predicted, measured, simulate_s, profile)) for
    a fresh trace of requests/rounds requests (seed + round), replayed live and simulated with the
    round's profile."""
    from tuner.sim import simulate
    from tuner.synth import parse_spec, synthesize
    from tuner.validate import compare

    requests = args.requests // args.rounds
    cluster = _cluster(model_dir, candidate)
    try:
        address = cluster.start()
        for rate in rates:
            trace = synthesize(parse_spec(SPEC.format(requests=requests, rate=rate, seed=args.seed + round_)))
            measured = asyncio.run(_replay(address, trace, args.warmup))
            started = time.perf_counter()
            predicted = simulate(trace, profile, candidate, seed=args.seed + round_)
            sample = (trace, predicted, measured, time.perf_counter() - started, profile)
            _print_row(candidate.label(), rate, f"round {round_ + 1}/{args.rounds}", compare(predicted, measured))
            yield rate, sample
    finally:
        cluster.stop()


def _pool(samples):
    """The rounds' traces, predictions and measurements as one: outcomes and measurements
    concatenated in arrival order (each round's arrivals shifted after the previous round's)."""
    import dataclasses

    trace, outcomes, measured, offset = [], [], [], 0.0
    for round_trace, predicted, round_measured, *_ in samples:
        ordered = sorted(round_trace, key=lambda r: r.arrival_s)
        trace += [dataclasses.replace(r, arrival_s=r.arrival_s + offset) for r in ordered]
        offset += (ordered[-1].arrival_s if ordered else 0.0) + 1.0
        outcomes += predicted.outcomes
        measured += list(round_measured)
    return trace, dataclasses.replace(samples[0][1], outcomes=outcomes), measured


def _row(label: str, rate: float, samples) -> dict:
    from tuner.validate import compare, compare_by_class, comparison_json

    trace, predicted, measured = _pool(samples)
    comparison = compare(predicted, measured)
    by_class = compare_by_class(trace, predicted, measured)
    components = _component_fits(samples)
    row = {"replicas": label, "rate_rps": rate, "requests": len(trace), "rounds": len(samples),
           "failed": sum(1 for m in measured if m.error), "simulate_s": sum(s[3] for s in samples),
           "comparison": comparison_json(comparison),
           "by_class": {name: comparison_json(rows) for name, rows in by_class.items()},
           "components": components}
    if len(samples) > 1:
        _print_row(label, rate, "pooled", comparison)
    print(json.dumps({"replicas": label, "rate": rate, "observed / profiled": components}), flush=True)
    return row


def _component_fits(samples) -> dict[str, float]:
    """Per profile component, the median live / profiled ratio over the rounds (each round judged
    against its own profile)."""
    import statistics

    from tuner.validate import component_fits

    ratios: dict[str, list[float]] = {}
    for trace, _, measured, _, profile in samples:
        for fit in component_fits(profile, trace, measured):
            ratios.setdefault(fit.name, []).append(fit.median_ratio)
    return {name: round(statistics.median(values), 3) for name, values in ratios.items()}


def _print_row(label: str, rate: float, what: str, comparison) -> None:
    print(json.dumps({"replicas": label, "rate": rate, "what": what, **{
        f"{c.metric}_{c.statistic}": [round(c.predicted_s * 1000, 1), round(c.measured_s * 1000, 1), f"{c.error:+.0%}"]
        for c in comparison}}), flush=True)


def _simulator_speed(profile) -> float:
    """Configurations simulated per second on a 1,000-request trace (the default synthetic one;
    separate and colocated encode)."""
    import dataclasses

    from tuner.cli import default_synthetic
    from tuner.sim import Candidate, simulate
    from tuner.synth import synthesize

    trace = synthesize(dataclasses.replace(default_synthetic(profile.max_context), requests=1000))
    candidates = [Candidate(e, p, d) for e in (1, 2) for p in (1, 2) for d in (1, 2, 4)]
    candidates += [Candidate(0, p, d, encode_colocated=True) for p in (1, 2) for d in (1, 2, 4)]
    started = time.perf_counter()
    for candidate in candidates:
        simulate(trace, profile, candidate)
    return len(candidates) / (time.perf_counter() - started)


def markdown(result: dict) -> str:
    classes = list(result["rows"][0].get("by_class", {})) if result["rows"] else []
    head = ("| E/P/D | rate | " + " | ".join(f"{m} {s} pred / meas (err)" for m, s in REPORTED)
            + "".join(f" | ttft p50 {name}" for name in classes) + " |")
    lines = [f"Tuner accuracy on {result['hardware']} ({result['date']}), model {result['model']}", "", head,
             "|" + "---|" * (2 + len(REPORTED) + len(classes))]
    for row in result["rows"]:
        cells = {(c["metric"], c["statistic"]): c for c in row["comparison"]}
        text = []
        for key in REPORTED:
            c = cells[key]
            err = f"{c['error']:+.0%}" if c["error"] is not None else "-"
            text.append(f"{c['predicted_ms']:.1f} / {c['measured_ms']:.1f} ({err})")
        for rows_ in row.get("by_class", {}).values():
            c = {(r["metric"], r["statistic"]): r for r in rows_}[("ttft", "p50")]
            text.append(f"{c['predicted_ms']:.1f} / {c['measured_ms']:.1f} ({c['error']:+.0%})")
        lines.append(f"| {row['replicas']} | {row['rate_rps']:g} | " + " | ".join(text) + " |")
    lines += ["", f"Simulator speed: {result['simulator_configs_per_s_1000_requests']:.1f} configurations/s "
              "on a 1,000-request trace."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
