"""``xtp plan MODEL --tp N``: the shard plan from the config alone (meta device, no weights)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="show how a model would be sharded (no weights read)",
        description="Print the shard plan: role of every module, per-rank sizes, bytes per rank "
        "and collectives per forward. Built from the config on the meta device.",
        epilog="examples:\n  xtp plan tiny-llama --tp 4\n  xtp plan ./my-checkpoint --tp 8 --json"
        "\n  xtp plan llama-1b --tp 2 --world 4 --nodes 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="built-in name, config JSON, or checkpoint folder")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--world", type=int, default=None,
                   help="ranks in the whole world (tp x dp): also show which global ranks form "
                   "each TP group and on which node, as torchrun would number them")
    p.add_argument("--nodes", type=int, default=1,
                   help="nodes the --world ranks run on, the same number on each (default 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import plan
    from ..models.builtin import resolve_config

    shard_plan = plan(resolve_config(args.model), args.tp)
    layout = _layout(args)
    if args.json:
        data = shard_plan.to_dict()
        if layout is not None:
            data["layout"] = layout.as_dict()
        print(json.dumps(data, indent=2))
    else:
        print(shard_plan)
        if layout is not None:
            print(f"\n{args.world} ranks on {args.nodes} node(s), tp {args.tp} x dp "
                  f"{args.world // args.tp}:\n{layout.describe()}")
    return 0


def _layout(args):
    """The TP groups of ``--world``/``--nodes`` (None without ``--world``), checked by the rules
    ``init_distributed`` applies (docs/topology.md).

    Raises:
        ArgumentError: ``--world``/``--nodes`` < 1, or ``--nodes`` does not divide ``--world``.
        TPSizeError: ``--tp`` does not divide the world, or would make a TP group span nodes.
    """
    if args.world is None:
        return None
    from ..accelerators.env import cross_node_tp
    from ..distributed.topology import Topology, check_placement
    from ..errors import ArgumentError, TPSizeError

    if args.world < 1 or args.nodes < 1 or args.world % args.nodes:
        raise ArgumentError(f"--world {args.world} ranks cannot be spread evenly over --nodes "
                            f"{args.nodes}; give a world that is a multiple of the nodes")
    if args.world % args.tp:
        divisors = [d for d in range(1, args.world + 1) if args.world % d == 0]
        raise TPSizeError(f"--tp {args.tp} does not divide --world {args.world}; choose --tp "
                          f"from {divisors}")
    layout = Topology.layout(args.world, args.tp, args.nodes)
    check_placement(layout, args.tp, cross_node_tp())
    return layout
