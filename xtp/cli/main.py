"""Entry point of the ``xtp`` command: sub-commands, and user errors without tracebacks."""

from __future__ import annotations

import argparse
import sys

from ..errors import XtpError
from . import bench as bench_cmd
from . import env, gather, preshard
from . import plan as plan_cmd
from . import run as run_cmd
from . import verify as verify_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xtp",
        description="Automatic tensor parallelism for PyTorch / Hugging Face models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run_cmd.add_parser(sub)
    plan_cmd.add_parser(sub)
    env.add_parser(sub)
    preshard.add_parser(sub)
    gather.add_parser(sub)
    verify_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except XtpError as exc:
        if args.debug:
            raise
        print(f"xtp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
