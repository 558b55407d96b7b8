"""The `tuner` command.

  tuner trace stats FILE [--json]    summarise an Azure (.csv) or Mooncake (.jsonl) trace
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
    stats = trace.add_parser("stats", help="request count, rate and token-length quantiles of a trace")
    stats.add_argument("file")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(run=_stats)
    return run_subcommand(parser, argv, (OSError, ValueError))


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
