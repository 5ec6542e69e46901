"""Step 5b of planning: expert containers outside transformers' experts interface, found from
the forward: a module with two 3-D parameters ``W1 (experts, hidden, a)`` and ``W2 (experts, b,
hidden)`` that it multiplies batch-wise as ``x @ W1`` ... ``h @ W2`` (``torch.bmm`` /
``matmul``), where the probe (:mod:`xtp.planning.probe`) saw

* ``W1``'s product reach ``W2``'s product's input and nothing else, and nothing but ``W1``'s
  product reach it (an expert MLP: up, activation, down);
* the module return ``W2``'s product after layout ops alone (no bias or other term added after
  the down product, which the all-reduce would add ``tp`` times);
* ``a == b`` (a plain up projection), or ``a == 2 b`` with the forward cutting ``W1``'s product
  into a gate half and an up half ([gate; up] concatenated: :mod:`xtp.planning.fused` replays
  its layout ops). Any other layout keeps the module whole.

Every expert's intermediate dimension ``b`` is split (aligned, as for an MLP): ``W1`` by its
output columns (both halves), ``W2`` by its input rows; one all-reduce of the module's output.
"""

from __future__ import annotations

from .draft import Draft
from .experts import _rank_bytes
from .fused import canonical_map, feature_map_parts
from .partition import Partition, split_aligned
from .probe import FlowGraph
from .spec import Collective, Layout, ModuleSpec, ParamSplit, Role, Split, WeightKind


def _gate_up_concatenated(graph: FlowGraph, param: str, inter: int) -> bool:
    """True when the forward cuts ``param``'s product into [gate; up] halves of ``inter``."""
    view = FlowGraph(layout_nodes={param: graph.layout_nodes.get(param, [])},
                     out_shapes={param: graph.param_shapes[param]})
    found = feature_map_parts(view, param, inter)
    return found is not None and found == canonical_map(Layout.GATE_UP_CONCAT, None, inter)


def expert_mlps(draft: Draft) -> list[tuple[str, str, str, bool]]:
    """(module, up parameter, down parameter, gated) of every expert container the forward
    shows (see the module docstring)."""
    g = draft.graph
    found = []
    for down, producers in g.param_producers.items():
        if len(producers) != 1:
            continue
        (up,) = producers
        mod_name, up_attr = up.rpartition(".")[::2]
        if (down.rpartition(".")[0] != mod_name or g.param_consumers.get(up) != {down}
                or g.module_out_nodes.get(mod_name, ("",))[0] != down
                or mod_name in draft.specs or mod_name in draft.rules):
            continue
        mod = draft.modules[mod_name]
        params = dict(mod.named_parameters(recurse=False))
        w1, w2 = params.get(up_attr), params.get(down.rpartition(".")[2])
        if len(params) != 2 or w1 is None or w2 is None or w1.dim() != 3 or w2.dim() != 3:
            continue
        inter = w2.shape[1]
        if w1.shape[1] != w2.shape[2] or w1.shape[0] != w2.shape[0] or inter < draft.tp:
            continue
        if w1.shape[2] == inter:
            found.append((mod_name, up_attr, down.rpartition(".")[2], False))
        elif w1.shape[2] == 2 * inter and _gate_up_concatenated(g, up, inter):
            found.append((mod_name, up_attr, down.rpartition(".")[2], True))
    return found


def plan_param_experts(draft: Draft) -> None:
    """Split every expert container :func:`expert_mlps` finds by its intermediate dimension."""
    tp = draft.tp
    for name, up, down, gated in expert_mlps(draft):
        mod = draft.modules[name]
        w2 = getattr(mod, down)
        inter = w2.shape[1]
        part = Partition(split_aligned(inter, tp))
        plain = tuple((part.range(r),) for r in range(tp))
        halves = tuple(((a, b), (inter + a, inter + b))
                       for a, b in (part.range(r) for r in range(tp)))
        splits = [ParamSplit(up, 2, halves if gated else plain), ParamSplit(down, 1, plain)]
        draft.specs[name] = ModuleSpec(
            name, Role.EXPERTS, WeightKind.EXPERT_WEIGHTS,
            f"forward: {w2.shape[0]} experts multiplied batch-wise by {up} then {down}"
            f"{' (gate; up halves)' if gated else ''}, intermediate size {inter} split",
            split=Split.IN, full=inter, ranges=plain, weight_shape=tuple(w2.shape),
            nbytes=_rank_bytes(mod, tp, splits), params=tuple(splits))
        draft.collectives.append(Collective("all_reduce", name, w2.shape[2]))
