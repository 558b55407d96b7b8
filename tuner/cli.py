"""The `tuner` command.

  tuner trace stats FILE [--json]                   summarise a trace (.csv: Azure, Azure LMM, BurstGPT,
                                                    Vidur; .jsonl: Mooncake or canonical)
  tuner trace synth [--spec "k=v,..."] [--seed N] --out FILE.jsonl
                                                    write a synthetic multimodal trace (keys: tuner/synth.py)
  tuner trace convert IN --out OUT.jsonl [--spec "k=v,..."] [--seed N] [--add-images] [--rate RPS]
                                                    any readable trace -> canonical JSONL; --spec draws the
                                                    images Azure LMM only counts (and with --add-images,
                                                    images for text-only requests); --rate rescales arrivals
  tuner profile --router ADDR --out profile.json    sweep a running deployment, fit per-stage service times
  tuner profile --endpoints encode=A --endpoints prefill=B[,C] --endpoints decode=D [--model DIR]
                [--redis-url URL] --out profile.json
                                                    the same on stage replicas directly (a private router)
  tuner optimize --slo ttft=2s [--slo tpot=50ms] [--slo e2e:p99=20s] [--trace FILE | --synthetic SPEC]
                 [--rate R] [--profile P] [--gpus N] [--trials N] [--storage URL] [--pareto]
                 [--min-keep-ratio R] [--allow-fastkv] [--encode-placement separate|colocated|search] --out DIR
                                                    the cheapest E/P/D deployment meeting the SLOs
  tuner validate --candidate K --from DIR --router ADDR [--trace FILE | --synthetic SPEC] [--rate R]
                                                    replay against a live deployment: predicted vs measured
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

from epdserve.cliutil import run_subcommand


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tuner", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(title="commands")
    trace = sub.add_parser("trace", help="workload traces").add_subparsers(title="trace commands")
    stats = trace.add_parser("stats", help="request count, rate, token-length quantiles and cache reuse of a trace")
    stats.add_argument("file")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(run=_stats)
    synth = trace.add_parser("synth", help="write a deterministic synthetic multimodal trace (canonical JSONL)")
    _add_spec_arguments(synth)
    synth.add_argument("--out", required=True, help="output .jsonl")
    synth.set_defaults(run=_synth)
    convert = trace.add_parser("convert", help="convert any readable trace to canonical JSONL")
    convert.add_argument("file")
    convert.add_argument("--out", required=True, help="output .jsonl")
    _add_spec_arguments(convert)
    convert.add_argument("--add-images", action="store_true", help="give text-only requests images per --spec")
    convert.add_argument("--rate", type=float, help="rescale arrivals to this mean rate (req/s)")
    convert.set_defaults(run=_convert)
    _add_profile(sub)
    _add_optimize(sub)
    _add_validate(sub)
    from epdserve.errors import EpdserveError

    return run_subcommand(parser, argv, (OSError, ValueError, EpdserveError))


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", default="", help='synthetic spec, e.g. "rate=4,requests=1000,images=0.6,'
                        'reuse=0.2,arrivals=bursty" (keys: SynthSpec fields or rate, images, reuse, turns, ...)')
    parser.add_argument("--seed", type=int, help="random seed (overrides seed= in --spec)")


def _spec(args: argparse.Namespace):
    from tuner.synth import parse_spec

    spec = parse_spec(args.spec)
    return spec if args.seed is None else dataclasses.replace(spec, seed=args.seed)


def _stats(args: argparse.Namespace) -> int:
    from tuner.traces import read_trace, summarize

    stats = summarize(read_trace(args.file))
    if args.json:
        print(json.dumps(dataclasses.asdict(stats)))
        return 0
    print(f"{stats.requests} requests over {stats.duration_s:.1f} s ({stats.mean_rate_rps:.2f} req/s)")
    for name in ("context_tokens", "generated_tokens", "images_per_request"):
        q = getattr(stats, name)
        print(f"  {name:<19} p50 {q['p50']:8.0f}  p90 {q['p90']:8.0f}  p99 {q['p99']:8.0f}  mean {q['mean']:9.1f}")
    if stats.prefix_reuse is not None:
        print(f"  prefix block reuse  {stats.prefix_reuse:.1%}")
    if stats.image_reuse is not None:
        print(f"  image reuse         {stats.image_reuse:.1%}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from tuner.synth import synthesize
    from tuner.traces import write_trace

    requests = synthesize(_spec(args))
    write_trace(args.out, requests)
    print(_summary_line(args.out, requests))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from tuner.synth import add_images, rescale
    from tuner.traces import read_trace, write_trace

    spec = _spec(args)
    requests = read_trace(args.file, image_spec=spec)
    if args.add_images:
        requests = add_images(requests, spec)
    if args.rate is not None:
        requests = rescale(requests, args.rate)
    write_trace(args.out, requests)
    print(_summary_line(args.out, requests))
    return 0


def _summary_line(path: str, requests) -> str:
    from tuner.traces import summarize

    stats = summarize(requests)
    images = sum(r.num_images for r in requests)
    parts = [f"{stats.requests} requests over {stats.duration_s:.1f} s ({stats.mean_rate_rps:.2f} req/s)",
             f"{images} images" + (f" ({stats.image_reuse:.1%} reused)" if stats.image_reuse is not None else "")]
    if stats.prefix_reuse is not None:
        parts.append(f"prefix reuse {stats.prefix_reuse:.1%}")
    return f"{path}: " + ", ".join(parts)


def _add_profile(sub) -> None:
    profile = sub.add_parser("profile", help="sweep a running deployment (through its router, or its stage "
                                             "replicas directly) and fit a profile")
    where = profile.add_mutually_exclusive_group(required=True)
    where.add_argument("--router", help="router address host:port")
    where.add_argument("--endpoints", action="append", metavar="STAGE=ADDR[,ADDR...]",
                       help="the stage replicas directly, once per stage (encode, prefill, decode): a private "
                            "router on loopback is started for the sweep (its clocks are not the stages')")
    profile.add_argument("--model", default="", help="with --endpoints: the deployment's checkpoint directory "
                                                    "(the private router's tokenizer; default: the tiny demo model)")
    profile.add_argument("--redis-url", default="", help="with --endpoints: the stages' mmcache Redis, so the private "
                                                         "router places by cached prefix as the deployment's would")
    profile.add_argument("--out", required=True, help="profile JSON to write")
    profile.add_argument("--shared-host-cores", type=int, default=0,
                         help="all replicas share this many CPU cores (a local deployment); 0: each has its own GPU")
    profile.add_argument("--shared-host-processes", type=int, default=None,
                         help="with --shared-host-cores: the deployment's service processes on that host, router "
                              "included; the CPU they use while idle is measured and taken from the cores the "
                              "simulator gives busy replicas (default with --endpoints: its addresses + the "
                              "private router; with --router: not measured)")
    profile.add_argument("--max-running", type=int, default=64, help="the decode replicas' --max-running")
    profile.add_argument("--kv-capacity-tokens", type=int, default=1 << 20, help="KV rows per decode replica")
    profile.add_argument("--prefix-block-tokens", type=int, default=32, help="the prefill replicas' setting")
    profile.add_argument("--measured-on", default="", help='hardware, e.g. "1x H200" (recorded in the profile)')
    profile.add_argument("--repeats", type=int, default=3, help="samples per sweep point")
    profile.add_argument("--idle-s", type=float, default=0.25,
                         help="mean pause before each measurement (a deployment serving a trace is rarely busy back "
                              "to back; idle replicas answer slower)")
    profile.add_argument("--seed", type=int, default=0)
    _add_security_arguments(profile)
    profile.set_defaults(run=_profile)


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """The router's token and mTLS files, as `epdserve generate` takes them."""
    from epdserve.config import SecurityConfig, add_config_args

    add_config_args(parser, SecurityConfig)


def _router_client(args: argparse.Namespace):
    """An AsyncClient of --router with the command's credentials (the environment as fallback)."""
    from epdserve.config import SecurityConfig, config_from_args
    from epdserve.env import read_env
    from epdserve.sdk import AsyncClient
    from epdserve.security import load_credentials

    credentials = load_credentials(config_from_args(SecurityConfig, args), read_env())
    return AsyncClient(args.router, token=credentials.token, tls=credentials.tls)


def _profile(args: argparse.Namespace) -> int:
    import asyncio

    from tuner.profiler import Deployment, Profiler, SweepConfig, summary_rows

    deployment = Deployment(args.prefix_block_tokens, args.max_running, args.kv_capacity_tokens,
                            args.shared_host_cores, args.measured_on, _shared_host_processes(args))

    async def run():
        async with _router_client(args) as client:
            sweep = SweepConfig(repeats=args.repeats, idle_s=args.idle_s, seed=args.seed)
            return await Profiler(client, sweep, progress=lambda text: print(f"  {text}", flush=True)).run(deployment)

    if args.endpoints:
        with _private_router(args) as address:
            args.router = address
            profile = asyncio.run(run())
    else:
        profile = asyncio.run(run())
    profile.save(args.out)
    print(f"{args.out}: {profile.model}")
    for name, fit in summary_rows(profile):
        terms = " + ".join(f"{c:.4g}*{t}" if t != "const" else f"{c:.4g}" for t, c in zip(fit.terms, fit.coef) if c)
        print(f"  {name:<28} {terms or '0'}   (n={fit.samples}, MAPE {fit.mape:.0%})")
    if profile.host_cores:
        print(f"  {'shared host':<28} {profile.host_cores} cores, {profile.idle_cores_per_process:.3f} of a core "
              f"per idle service process")
    return 0


def _shared_host_processes(args: argparse.Namespace) -> int:
    if args.shared_host_cores <= 0:
        return 0
    if args.shared_host_processes is not None:
        if args.shared_host_processes < 0:
            raise SystemExit(f"--shared-host-processes must be >= 0 (got {args.shared_host_processes})")
        return args.shared_host_processes
    if args.endpoints:
        return len({a for addresses in parse_endpoints(args.endpoints).values() for a in addresses}) + 1
    print("  note: idle CPU not measured (give --shared-host-processes: the router and every replica)")
    return 0


def parse_endpoints(values: list[str]) -> dict[str, tuple[str, ...]]:
    """["encode=h:1", "prefill=h:2,h:3", ...] -> {"encode": ("h:1",), ...}; every stage once."""
    stages = ("encode", "prefill", "decode")
    endpoints: dict[str, tuple[str, ...]] = {}
    for value in values:
        stage, _, addresses = value.partition("=")
        if stage not in stages or not addresses:
            raise SystemExit(f"--endpoints {value!r}: expected STAGE=ADDR[,ADDR...] with STAGE one of "
                             f"{', '.join(stages)}")
        if stage in endpoints:
            raise SystemExit(f"--endpoints: {stage} given twice (list its replicas comma-separated)")
        endpoints[stage] = tuple(a.strip() for a in addresses.split(",") if a.strip())
    missing = [stage for stage in stages if stage not in endpoints]
    if missing:
        raise SystemExit(f"--endpoints: no address for {', '.join(missing)}")
    return endpoints


@contextlib.contextmanager
def _private_router(args: argparse.Namespace):
    """A router on loopback in front of --endpoints (with the command's credentials), stopped after."""
    import pathlib

    from epdserve.config import SecurityConfig, config_from_args
    from epdserve.env import read_env
    from epdserve.launcher import ClusterConfig, LocalCluster
    from epdserve.models.tiny import cached_tiny_checkpoint

    model = pathlib.Path(args.model) if args.model else cached_tiny_checkpoint(read_env().cache_dir)
    config = ClusterConfig(model_dir=model, redis_url=args.redis_url, endpoints=parse_endpoints(args.endpoints),
                           security=config_from_args(SecurityConfig, args))
    with LocalCluster(config) as cluster:
        yield cluster.router_address


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--trace", help="workload trace (.jsonl Mooncake/canonical, .csv Azure/BurstGPT/Vidur)")
    source.add_argument("--synthetic", help='synthetic trace spec, e.g. "rate=4,requests=1000,images=0.6"')
    parser.add_argument("--rate", type=float, help="rescale the trace's arrivals to this mean rate (req/s)")
    parser.add_argument("--profile", default="", help="profile JSON (tuner profile) or a bundled profile name")
    parser.add_argument("--seed", type=int, default=0)


def _workload(args: argparse.Namespace):
    """(requests, profile, description) from the workload arguments, with the defaults said aloud."""
    from tuner.profile import bundled_profiles, load_profile
    from tuner.synth import parse_spec, rescale, synthesize
    from tuner.traces import read_trace

    notes = []
    if not args.profile:
        args.profile = DEFAULT_PROFILE
        notes.append(f"no --profile: using the bundled profile {DEFAULT_PROFILE!r} "
                     f"({sorted(bundled_profiles())} ship with the package)")
    profile = load_profile(args.profile)
    if args.trace:
        requests, source = read_trace(args.trace), args.trace
    else:
        spec = parse_spec(args.synthetic or "", base=default_synthetic(profile.max_context))
        requests = synthesize(dataclasses.replace(spec, seed=spec.seed + args.seed))
        source = f"synthetic({args.synthetic or 'default'})"
        if not args.synthetic:
            notes.append("no --trace: using a synthetic multimodal trace (tuner trace synth; lengths fitted to the "
                         f"model's {profile.max_context}-token context)")
    if args.rate:
        requests = rescale(requests, args.rate)
    image_tokens = profile.image_tokens()
    too_long = sum(1 for r in requests
                   if r.context_tokens + r.num_images * image_tokens + r.generated_tokens > profile.max_context)
    if too_long:
        notes.append(f"{too_long} of {len(requests)} requests exceed the profiled model's {profile.max_context}-token "
                     "context: the router would refuse them, so they are counted as rejected, not in the percentiles")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return requests, profile, source


DEFAULT_PROFILE = "cpu-tiny"


def default_synthetic(max_context: int):
    """The default synthetic workload, its lengths scaled to fit the model's context."""
    from tuner.synth import SynthSpec

    base = SynthSpec()
    if max_context >= 32768:
        return base
    return dataclasses.replace(base, requests=1000, text_median=max(16, max_context // 10), text_max=max_context // 2,
                               output_median=max(8, max_context // 40), output_max=max_context // 4,
                               prefix_share=0.0 if max_context < 4096 else base.prefix_share, system_blocks=1)


ENCODE_PLACEMENTS = {"separate": (False,), "colocated": (True,), "search": (False, True)}  # -> encode_colocated


def _add_optimize(sub) -> None:
    optimize = sub.add_parser("optimize", help="search replicas and settings that meet SLOs at the lowest cost")
    optimize.add_argument("--slo", action="append", required=True,
                          help="METRIC[:pNN]=DURATION, METRIC in ttft, tpot, e2e; default percentile p90; repeatable")
    _add_workload_arguments(optimize)
    optimize.add_argument("--gpus", type=int, default=0, help="GPU budget (0 = none)")
    optimize.add_argument("--gpu-price", type=float, default=0.0, help="$ per GPU-hour: minimise $/h instead of GPUs")
    optimize.add_argument("--max-replicas", type=int, default=8, help="most replicas per stage")
    optimize.add_argument("--allow-fastkv", action="store_true",
                          help="also try prefill --fastkv (lossy: see docs/BENCHMARKS.md) at the profiled rates")
    optimize.add_argument("--min-keep-ratio", type=float, default=1.0,
                          help="allow Dynamic-LLaVA image-token sparsification down to this keep ratio (1 = lossless)")
    optimize.add_argument("--encode-placement", choices=sorted(ENCODE_PLACEMENTS), default="search",
                          help="encode on its own replicas (separate), on the prefill replicas (colocated: E+P, "
                               "prefill --with-encode, no encode GPUs), or try both (search)")
    optimize.add_argument("--trials", type=int, default=200)
    optimize.add_argument("--storage", default=None, help="Optuna storage, e.g. sqlite:///tuner.db (resumable)")
    optimize.add_argument("--pareto", action="store_true", help="two objectives: cost and the first SLO's metric")
    optimize.add_argument("--top", type=int, default=5, help="candidates to refine and report")
    optimize.add_argument("--out", required=True, help="output directory")
    optimize.add_argument("--no-progress", action="store_true")
    optimize.set_defaults(run=_optimize)


def _optimize(args: argparse.Namespace) -> int:
    import pathlib

    from tuner.optimize import Objective, SearchSpace, parse_slo, run_study
    from tuner.report import print_table, write_outputs
    from tuner.sim import simulate

    slos = [parse_slo(text) for text in args.slo]
    if not 0 < args.min_keep_ratio <= 1:
        raise ValueError(f"--min-keep-ratio must be in (0, 1] (got {args.min_keep_ratio})")
    requests, profile, source = _workload(args)
    keep = tuple(r for r in (1.0, 0.75, 0.5, 0.25) if r >= args.min_keep_ratio - 1e-9)
    if args.allow_fastkv and profile.prefill.fastkv_compute_ms is None:
        raise ValueError(f"--allow-fastkv: profile {args.profile or '(bundled)'} has no FastKV prefill measurements; "
                         f"profile the deployment again with this version of `tuner profile`")
    space = SearchSpace(max_replicas=args.max_replicas, gpus=args.gpus, gpu_hour_price=args.gpu_price,
                        image_keep_ratio=keep, fastkv=(False, True) if args.allow_fastkv else (False,),
                        encode_colocated=ENCODE_PLACEMENTS[args.encode_placement])
    objective = Objective(requests, profile, slos, space, seed=args.seed)
    _check_reachable(objective, slos)
    outcome = run_study(objective, trials=args.trials, storage=args.storage, pareto=args.pareto, seed=args.seed,
                        top=args.top, progress=not args.no_progress)
    context = {"profile": f"{args.profile} ({profile.model}; measured on {profile.measured_on or '?'}, "
                          f"{profile.measured_at or '?'})",
               "trace": f"{source}: {len(requests)} requests at {objective.bounds.rate_rps:.2f} req/s",
               "study": outcome.study.study_name, "storage": args.storage or "in memory"}
    out = pathlib.Path(args.out)
    best = None
    if outcome.ranked:
        result = simulate(requests, profile, outcome.ranked[0].candidate, seed=args.seed)
        best = {m: result.values(m).tolist() for m in ("ttft", "tpot", "e2e")}
    written = write_outputs(out, outcome, slos, context=context, gpus_per_replica=space.gpus_per_replica,
                            best_latencies=best)
    if outcome.ranked:
        print_table(outcome.ranked)
        print(f"wrote {', '.join(str(p) for p in written)}")
        return 0
    print("no candidate met every SLO; closest (see report.md):", file=sys.stderr)
    for s in outcome.closest:
        print(f"  {s.candidate.label()}: " + ", ".join(f"{k} slack {v:+.0%}" for k, v in s.slack.items()),
              file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 2


def _check_reachable(objective, slos) -> None:
    """Refuse SLOs no deployment can meet (even alone, with the most aggressive settings allowed)."""
    import numpy as np

    from tuner.sim import Candidate

    keep = min(objective.space.image_keep_ratio)
    local = max(objective.space.local_prefill_tokens)
    colocated = objective.space.encode_colocated[0]   # a request alone fares the same either way
    alone = [objective.bounds.unloaded(Candidate(0 if colocated else 1, image_keep_ratio=keep, fastkv=fastkv,
                                                 local_prefill_tokens=local, encode_colocated=colocated))
             for fastkv in objective.space.fastkv]
    for slo in slos:
        floor = min(float(np.percentile(a[slo.metric], slo.percentile)) if len(a[slo.metric]) else 0.0 for a in alone)
        if floor > slo.target_s:
            raise ValueError(f"--slo {slo.label()}: unreachable on this profile and workload: even a request "
                             f"alone in the deployment has {slo.metric} p{slo.percentile:g} = {floor * 1000:.0f} ms")


def _add_validate(sub) -> None:
    validate = sub.add_parser("validate", help="replay a trace against a live deployment: predicted vs measured")
    validate.add_argument("--router", required=True, help="router address host:port of the deployed candidate")
    validate.add_argument("--from", dest="from_dir", required=True, help="the optimize output directory")
    validate.add_argument("--candidate", type=int, default=1, help="candidate rank in candidates.json (1 = best)")
    _add_workload_arguments(validate)
    validate.add_argument("--warmup", type=int, default=30,
                          help="requests shaped like the trace's served first and not measured (one-time costs)")
    validate.add_argument("--out", default="", help="write validation.json here (default: the --from directory)")
    _add_security_arguments(validate)
    validate.set_defaults(run=_validate)


def _validate(args: argparse.Namespace) -> int:
    import asyncio
    import pathlib

    from tuner.live import PromptMaker, replay, warm_up
    from tuner.report import load_candidate
    from tuner.sim import simulate
    from tuner.validate import compare, compare_by_class, comparison_json, component_fits, verdict

    candidate, _ = load_candidate(pathlib.Path(args.from_dir) / "candidates.json", args.candidate)
    requests, profile, source = _workload(args)
    predicted = simulate(requests, profile, candidate, seed=args.seed)

    async def run():
        async with _router_client(args) as client:
            prompts = PromptMaker(seed=args.seed)
            await prompts.calibrate(client)
            await warm_up(client, requests, prompts, args.warmup)
            return await replay(client, requests, prompts)

    print(f"replaying {len(requests)} requests ({source}) against {args.router} as {candidate.label()} ...")
    measured = asyncio.run(run())
    rows = compare(predicted, measured)
    failed = sum(1 for m in measured if m.error)
    print(f"{'metric':<6} {'stat':<5} {'predicted ms':>13} {'measured ms':>12} {'error':>7}")
    for r in rows:
        print(f"{r.metric:<6} {r.statistic:<5} {r.predicted_s * 1000:13.1f} {r.measured_s * 1000:12.1f} "
              f"{r.error:+7.0%}{'' if r.within else '  (beyond ' + format(r.bound, '.0%') + ')'}")
    for name, class_rows in compare_by_class(requests, predicted, measured).items():
        print(f"  {name}: " + ", ".join(f"{r.metric} {r.statistic} {r.predicted_s * 1000:.1f} / "
                                        f"{r.measured_s * 1000:.1f} ms ({r.error:+.0%})" for r in class_rows))
    components = component_fits(profile, requests, measured)
    print("  live / profiled, per component (median; under load queueing and contention add to it): " + ", ".join(
        f"{c.name} {c.median_ratio:.2f}" for c in components))
    label = verdict(rows, failed)
    print(f"candidate {args.candidate}: {label}")
    out = pathlib.Path(args.out or args.from_dir) / "validation.json"
    out.write_text(json.dumps({"candidate": args.candidate, "label": candidate.label(), "trace": source,
                               "requests": len(requests), "failed": failed, "verdict": label,
                               "comparison": comparison_json(rows),
                               "components": {c.name: c.median_ratio for c in components}}, indent=1) + "\n")
    return 0 if label == "VERIFIED" else 3


if __name__ == "__main__":
    sys.exit(main())
