"""Which global ranks run on which host, which form each TP group, and the placement rules.

A *node* is one host: ranks whose hostname and boot id are equal (the identity
:func:`xtp.init_distributed` already exchanges once, for failure reports; the shared-memory
all-reduce proves "one host" the same way). The rules (docs/topology.md):

* a TP group never spans nodes (every layer all-reduces over it: it wants the fastest links,
  and shared memory works only inside a host) unless the user opts in explicitly with
  ``init_distributed(..., allow_cross_node_tp=True)`` or ``XTP_CROSS_NODE_TP=1``; then a
  :class:`CrossNodeTPWarning` names the cost;
* so ``tp_size`` must divide the ranks per node (:class:`~xtp.errors.TPSizeError` lists the
  divisors); data-parallel groups span the nodes;
* TP groups are consecutive global ranks, so torchrun's node-by-node numbering with the same
  ``--nproc-per-node`` on every node keeps each inside one node; any other numbering that
  splits a group is a :class:`~xtp.errors.DistributedSetupError` saying which host has which
  ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..accelerators.comm.failures import Peer
from ..accelerators.comm.host import this_process
from ..accelerators.env import ENV_CROSS_NODE_TP
from ..errors import DistributedSetupError, TPSizeError

OPT_IN = f"init_distributed(..., allow_cross_node_tp=True) or {ENV_CROSS_NODE_TP}=1"
COST = ("every transformer block then runs two all-reduces over the network (the "
        "inter-node link, typically 10-100x slower than links inside a node) and the "
        "shared-memory all-reduce cannot be used")


class CrossNodeTPWarning(UserWarning):
    """A TP group spans nodes because the user asked for it; the message names the cost."""


@dataclass(frozen=True)
class Topology:
    """Placement of a world: ``hosts[r]`` and ``nodes[r]`` (node index, in order of first rank)
    for each global rank ``r`` this process knows (``"?"``/``-1`` for one it does not: an
    adopted group knows its own members only), and the global ranks of each TP group."""

    hosts: tuple[str, ...]
    nodes: tuple[int, ...]
    tp_groups: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, world: int, tp_groups: Sequence[Sequence[int]],
              peers: Mapping[int, Peer]) -> Topology:
        """From the exchanged identities ``peers`` (global rank -> :class:`Peer`); a world of
        one rank needs none (this process)."""
        if world == 1 and 0 not in peers:
            me = this_process()
            peers = {0: Peer(0, me.hostname, me.pid_space, me.pid)}
        keys: dict[tuple[str, str], int] = {}
        hosts, nodes = [], []
        for r in range(world):
            p = peers.get(r)
            if p is None:
                hosts.append("?")
                nodes.append(-1)
                continue
            key = (p.host, p.machine.split("/")[0])  # hostname + boot id, not the pid namespace
            hosts.append(p.host)
            nodes.append(keys.setdefault(key, len(keys)))
        return cls(tuple(hosts), tuple(nodes), tuple(tuple(g) for g in tp_groups))

    @classmethod
    def layout(cls, world: int, tp_size: int, nodes: int = 1) -> Topology:
        """The placement ``torchrun`` gives ``world`` ranks on ``nodes`` nodes with the same
        ``--nproc-per-node`` (ranks numbered node by node; hosts named ``node0``, ``node1``,
        ...) split into TP groups of ``tp_size`` consecutive ranks: what ``xtp plan --world``
        shows, before any rank starts (``world`` divisible by ``tp_size`` and ``nodes``)."""
        per = world // nodes
        return cls(tuple(f"node{r // per}" for r in range(world)),
                   tuple(r // per for r in range(world)),
                   tuple(tuple(range(k, k + tp_size)) for k in range(0, world, tp_size)))

    @property
    def num_nodes(self) -> int:
        return len({n for n in self.nodes if n >= 0})

    def node_ranks(self) -> dict[str, list[int]]:
        """Host name -> the global ranks running there (known ranks only)."""
        out: dict[str, list[int]] = {}
        for r, (h, n) in enumerate(zip(self.hosts, self.nodes)):
            if n >= 0:
                out.setdefault(h if h else f"node {n}", []).append(r)
        return out

    def ranks_per_node(self) -> int | None:
        """Ranks on each node when every node runs the same number, else ``None``."""
        counts = {sum(1 for n in self.nodes if n == k) for k in set(self.nodes) if k >= 0}
        return counts.pop() if len(counts) == 1 else None

    def spanning(self) -> list[tuple[int, ...]]:
        """The TP groups whose ranks run on more than one node."""
        return [g for g in self.tp_groups
                if len({self.nodes[r] for r in g if self.nodes[r] >= 0}) > 1]

    def as_dict(self) -> dict:
        """JSON-able: each TP group's ranks and hosts, and each host's ranks."""
        return {"tp_groups": [{"ranks": list(g), "hosts": sorted({self.hosts[r] for r in g})}
                              for g in self.tp_groups],
                "nodes": self.node_ranks()}

    def describe(self) -> str:
        """One line per TP group: ``tp group 0: ranks 0, 1 on host-a``."""
        lines = []
        for k, g in enumerate(self.tp_groups):
            on = ", ".join(sorted({self.hosts[r] for r in g}))
            lines.append(f"tp group {k}: ranks {', '.join(map(str, g))} on {on}")
        return "\n".join(lines)


def _where(topo: Topology, group: Sequence[int]) -> str:
    by_host: dict[str, list[int]] = {}
    for r in group:
        by_host.setdefault(topo.hosts[r], []).append(r)
    return "; ".join(f"ranks {', '.join(map(str, rs))} on {h}" for h, rs in by_host.items())


def check_placement(topo: Topology, tp_size: int, allow_cross_node: bool) -> None:
    """Apply the rules of the module doc to ``topo`` (same answer on every rank: it is built
    from the same exchanged identities).

    Raises:
        TPSizeError: a TP group would span nodes because ``tp_size`` does not divide the ranks
            per node; the message lists the sizes that do.
        DistributedSetupError: a TP group spans nodes although ``tp_size`` divides the ranks
            per node (ranks not numbered node by node, or nodes with different rank counts).
    Warns:
        CrossNodeTPWarning: a TP group spans nodes and ``allow_cross_node`` is set.
    """
    spans = topo.spanning()
    if not spans:
        return
    first = spans[0]
    if allow_cross_node:
        warnings.warn(CrossNodeTPWarning(
            f"tp_size={tp_size}: {len(spans)} TP group(s) span nodes (e.g. {_where(topo, first)}),"
            f" as asked ({OPT_IN}); {COST}. For speed keep tp inside a node and use data "
            "parallel across nodes"), stacklevel=4)
        return
    per_node = topo.ranks_per_node()
    hosts = "; ".join(f"{h}: ranks {', '.join(map(str, rs))}"
                      for h, rs in topo.node_ranks().items())
    if per_node is not None and per_node % tp_size:
        divisors = [d for d in range(1, per_node + 1) if per_node % d == 0]
        raise TPSizeError(
            f"tp_size={tp_size} would make a TP group span nodes ({_where(topo, first)}); "
            f"each of the {topo.num_nodes} nodes runs {per_node} ranks, so choose tp_size from "
            f"{divisors} (tensor parallel inside a node, data parallel across nodes), or opt in "
            f"to cross-node tensor parallel with {OPT_IN} ({COST})")
    why = ("the nodes run different numbers of ranks" if per_node is None else
           f"tp_size={tp_size} divides the {per_node} ranks per node, but the ranks are not "
           "numbered node by node")
    raise DistributedSetupError(
        f"TP group of global ranks {list(first)} would span nodes ({_where(topo, first)}): "
        f"{why} ({hosts}). TP groups are consecutive global ranks: start every node with the "
        "same --nproc-per-node and let torchrun number the ranks node by node, or opt in to "
        f"cross-node tensor parallel with {OPT_IN} ({COST})")
