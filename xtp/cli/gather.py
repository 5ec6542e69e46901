"""``xtp gather PRESHARDED_DIR OUT_DIR``: a pre-sharded folder back into one ordinary checkpoint
(transformers loads it), offline, one process."""

from __future__ import annotations

import argparse
import re

from .options import dtype_arg

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000; ``"512MiB"``; a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def add_parser(sub) -> None:
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


def run_gather(args) -> int:
    from ..loading.offline import gather

    out = gather(args.src_dir, args.out_dir, max_shard_size=args.max_shard_size,
                 dtype=dtype_arg(args.dtype), progress=False if args.no_progress else None)
    print(f"wrote {out}")
    return 0
