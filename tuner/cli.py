"""The `tuner` command.

  tuner trace stats FILE [--json]                   summarise a trace (.csv: Azure, Azure LMM, BurstGPT,
                                                    Vidur; .jsonl: Mooncake or canonical)
  tuner trace synth [--spec "k=v,..."] [--seed N] --out FILE.jsonl
                                                    write a synthetic multimodal trace (keys: tuner/synth.py)
  tuner trace convert IN --out OUT.jsonl [--spec "k=v,..."] [--seed N] [--add-images] [--rate RPS]
                                                    any readable trace -> canonical JSONL; --spec draws the
                                                    images Azure LMM only counts (and with --add-images,
                                                    images for text-only requests); --rate rescales arrivals
"""

from __future__ import annotations

import argparse
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
    return run_subcommand(parser, argv, (OSError, ValueError))


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


if __name__ == "__main__":
    sys.exit(main())
