"""What the `epdserve` and `tuner` commands share: run the chosen subcommand, turning expected
failures into one `error: ...` line and an exit code instead of a traceback."""

from __future__ import annotations

import argparse
import sys


def run_subcommand(parser: argparse.ArgumentParser, argv: list[str] | None,
                   expected: tuple[type[BaseException], ...]) -> int:
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except expected as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
