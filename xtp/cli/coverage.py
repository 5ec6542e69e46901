"""``xtp coverage [--tp 2,3] [--types a,b] [--kind causal,masked,seq2seq] [--out FILE]``: every
LM model type of the installed transformers, built tiny, sharded and compared with the unsharded
model over real local CPU ranks. One line per type; a markdown summary and table at the end.

Exit codes: 0 no wrong result; 1 at least one type's sharded numbers differ from the unsharded
model's (``WRONG``: always a bug in xtp); 2 a bad argument.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import XtpError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "coverage", help="shard every transformers LM type (tiny) and check it",
        description="Build every model type of the installed transformers' causal-LM, masked-LM "
        "and seq2seq-LM auto mappings tiny (seeded), shard it at each tp size over local CPU "
        "ranks and compare with the unsharded model: logits rel. error <= 1e-5 (fp32), the "
        "same greedy tokens, and the share of the weights the fullest rank holds.",
        epilog="examples:\n  xtp coverage --tp 2,3 --out coverage.json\n"
        "  xtp coverage --types llama,gpt2 --tp 3",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", default="2,3", help="comma-separated tp sizes (default 2,3)")
    p.add_argument("--types", default=None, help="comma-separated model types (default: all)")
    p.add_argument("--kind", default="causal,masked,seq2seq",
                   help="which auto mappings to take types from (default: all three)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--markdown", default=None, help="write the summary and table to this file")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds one type may take before it is recorded as an error")
    p.set_defaults(func=run)


def parse_tps(text: str) -> list[int]:
    """``"2,3"`` -> ``[2, 3]``; anything but distinct integers >= 2 is an XtpError."""
    try:
        tps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        tps = []
    if not tps or any(t < 2 for t in tps) or len(set(tps)) != len(tps):
        raise XtpError(f"--tp {text!r}: give distinct tp sizes >= 2, comma-separated (e.g. 2,3)")
    return tps


def parse_kinds(text: str) -> list[str]:
    from ..bench.coverage import KINDS

    kinds = [x.strip() for x in text.split(",") if x.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise XtpError(f"--kind {text!r}: choose from {', '.join(KINDS)}, comma-separated")
    return kinds


def run(args) -> int:
    from ..bench.coverage import model_types, sweep
    from ..bench.coverage_report import markdown, wrong

    tps, kinds = parse_tps(args.tp), parse_kinds(args.kind)
    if args.timeout <= 0:
        raise XtpError(f"--timeout {args.timeout}: give a positive number of seconds")
    only = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else None
    types = model_types(kinds, only)
    if only is not None:
        missing = sorted(set(only) - {name for name, _ in types})
        if missing:
            raise XtpError(f"--types: {', '.join(missing)} not in the installed transformers' "
                           f"{'/'.join(kinds)} LM mappings")
    for path in (args.out, args.markdown):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise XtpError(f"{path}: its folder does not exist")
    doc = sweep(types, tps, args.timeout, say=lambda line: print(line, flush=True))
    text = markdown(doc)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    bad = wrong(doc)
    if bad:
        print(f"xtp coverage: WRONG results (sharded numbers differ from the unsharded model; "
              f"a bug in xtp): {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0
