"""``xtp plan MODEL --tp N``: the shard plan from the config alone (meta device, no weights)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="show how a model would be sharded (no weights read)",
        description="Print the shard plan: role of every module, per-rank sizes, bytes per rank "
        "and collectives per forward. Built from the config on the meta device.",
        epilog="examples:\n  xtp plan tiny-llama --tp 4\n  xtp plan ./my-checkpoint --tp 8 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="built-in name, config JSON, or checkpoint folder")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import plan
    from ..models.builtin import resolve_config

    shard_plan = plan(resolve_config(args.model), args.tp)
    print(json.dumps(shard_plan.to_dict(), indent=2) if args.json else shard_plan)
    return 0
