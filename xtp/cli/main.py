"""Entry point of the ``xtp`` command: sub-commands, and every failure as one line.

Exit codes: 0 success; 1 the command ran and its check failed (``verify``: a mismatch), or an
internal failure (an exception xtp did not expect: a bug in xtp, reported as one line that says
so); 2 a user error: a typed :class:`~xtp.errors.XtpError` (a bad argument, config, checkpoint,
environment variable, a rank that failed), a wrong command line, or a file-system error on a
path the user gave. ``--debug`` shows the traceback instead of the one line.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import XtpError
from . import bench as bench_cmd
from . import coverage as coverage_cmd
from . import env, gather, preshard
from . import plan as plan_cmd
from . import run as run_cmd
from . import verify as verify_cmd

USER_ERROR, INTERNAL_ERROR = 2, 1


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit 2), pointing at ``--help``."""

    def error(self, message: str):
        self.exit(USER_ERROR, f"{self.prog}: error: {' '.join(message.split())} "
                              f"(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    coverage_cmd.add_parser(sub)
    return parser


def _say(command: str, text: str) -> None:
    print(f"xtp {command}: error: {' '.join(text.split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return USER_ERROR
    try:
        return int(args.func(args) or 0)
    except XtpError as exc:
        if args.debug:
            raise
        _say(args.command, str(exc))
        return USER_ERROR
    except OSError as exc:  # a path the user gave: missing, not writable, disk full
        if args.debug:
            raise
        _say(args.command, f"{type(exc).__name__}: {exc}")
        return USER_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        _say(args.command, "interrupted")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        _say(args.command, f"internal error, a bug in xtp: {type(exc).__name__}: {exc} "
             f"(run xtp --debug {args.command} ... for the traceback and report it)")
        return INTERNAL_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
