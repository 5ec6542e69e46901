"""``xtp preshard MODEL_DIR OUT_DIR --tp N``: per-rank files for N ranks, offline, one process.

It writes the per-rank files ``xtp.from_pretrained`` loads under ``torchrun --nproc-per-node N``
(each rank then reads only its own file); ``xtp gather`` (:mod:`xtp.cli.gather`) turns such a
folder back into an ordinary checkpoint.
"""

from __future__ import annotations

import argparse

from ..errors import XtpError
from .options import dtype_arg


def add_parser(sub) -> None:
    p = sub.add_parser(
        "preshard",
        help="write per-rank files for a TP size from a full checkpoint (offline)",
        description="Read a checkpoint folder (config.json + safetensors or .bin) and write one "
        "safetensors file per TP rank plus xtp_metadata.json, in one process. Load the result "
        "with xtp.from_pretrained(OUT_DIR) under torchrun with the same number of ranks.",
        epilog="example:\n  xtp preshard ./Llama-3.2-1B ./llama-tp4 --tp 4 --dtype bfloat16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", help="checkpoint folder (local)")
    p.add_argument("out_dir", help="folder to write (created; an old pre-sharded one is replaced)")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    p.add_argument("--dtype", default=None, help="store as this dtype (default: the config's)")
    p.add_argument("--replicate", action="append", default=[], metavar="GLOB",
                   help="keep modules matching GLOB whole on every rank (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.set_defaults(func=run_preshard)


def run_preshard(args) -> int:
    from ..loading.offline import preshard

    if args.tp < 1:
        raise XtpError(f"--tp must be >= 1, got {args.tp}")
    rules = {g: "replicate" for g in args.replicate} or None
    out = preshard(args.model_dir, args.out_dir, args.tp, dtype=dtype_arg(args.dtype), rules=rules,
                   progress=False if args.no_progress else None)
    print(f"wrote {out} for tp={args.tp}")
    return 0
