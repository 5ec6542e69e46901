"""``xtp preshard`` and ``xtp gather``: offline conversions, one process, no ranks started.

``xtp preshard MODEL_DIR OUT_DIR --tp N`` writes the per-rank files ``xtp.from_pretrained``
loads under ``torchrun --nproc-per-node N`` (each rank then reads only its own file).
``xtp gather PRESHARDED_DIR OUT_DIR`` turns such a folder back into an ordinary checkpoint.
"""

from __future__ import annotations

import argparse
import re

from ..errors import XtpError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000; ``"512MiB"``; a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


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

    g = sub.add_parser(
        "gather",
        help="turn a pre-sharded folder back into one ordinary checkpoint (offline)",
        description="Stream the per-rank files of a pre-sharded folder back into "
        "model.safetensors (or numbered files + index), loadable by transformers.",
        epilog="example:\n  xtp gather ./llama-tp4 ./llama-full --max-shard-size 5GB",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("src_dir", help="pre-sharded folder")
    g.add_argument("out_dir", help="new folder to write")
    g.add_argument("--max-shard-size", type=parse_size, default=None,
                   help="split the output into files of at most this size (e.g. 5GB)")
    g.add_argument("--dtype", default=None, help="convert floating-point tensors to this dtype")
    g.add_argument("--no-progress", action="store_true", help="no progress line")
    g.set_defaults(func=run_gather)


def _dtype(name: str | None):
    if name is None:
        return None
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise XtpError(f"--dtype {name!r} is not a torch dtype; use e.g. bfloat16, float16")
    return dt


def run_preshard(args) -> int:
    from ..loading.offline import preshard

    if args.tp < 1:
        raise XtpError(f"--tp must be >= 1, got {args.tp}")
    rules = {g: "replicate" for g in args.replicate} or None
    out = preshard(args.model_dir, args.out_dir, args.tp, dtype=_dtype(args.dtype), rules=rules,
                   progress=False if args.no_progress else None)
    print(f"wrote {out} for tp={args.tp}")
    return 0


def run_gather(args) -> int:
    from ..loading.offline import gather

    out = gather(args.src_dir, args.out_dir, max_shard_size=args.max_shard_size,
                 dtype=_dtype(args.dtype), progress=False if args.no_progress else None)
    print(f"wrote {out}")
    return 0
