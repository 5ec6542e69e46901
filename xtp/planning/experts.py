"""Step 5 of planning: fused 3-D MoE experts (the transformers experts interface, see
:data:`xtp.planning.model_table.EXPERT_PARAMS`).

Every expert's intermediate dimension is split (aligned, as for an MLP): the gate/up tensor by
its output rows (both halves of a concatenated [gate; up], or pairs of an interleaved one), the
down tensor by its input columns. A down bias stays whole on rank 0 and zero elsewhere (the
following all-reduce would add it ``tp`` times). One all-reduce of the hidden states.
"""

from __future__ import annotations

from torch import nn

from . import model_table as mt
from .draft import Draft
from .layouts import ranges_len
from .partition import Partition, split_aligned
from .render import collapse
from .spec import AttrUpdate, Collective, ModuleSpec, ParamSplit, Role, Split, WeightKind


def _param_splits(mod: nn.Module, tp: int, inter: int, part: Partition) -> list[ParamSplit]:
    """Per-parameter splits of one experts module (intermediate size ``inter`` as ``part``)."""
    e = mt.EXPERT_PARAMS
    transposed = bool(mod.is_transposed)
    concat = bool(getattr(mod, "is_concatenated", True))

    def packed(r):
        a, b = part.range(r)
        return ((a, b), (inter + a, inter + b)) if concat else ((2 * a, 2 * b),)

    gate_up_name = e.gate_up if getattr(mod, "has_gate", True) else e.up
    in_dim = 2 if transposed else 1
    splits = [
        ParamSplit(gate_up_name, in_dim, tuple(
            packed(r) if gate_up_name == e.gate_up else (part.range(r),) for r in range(tp))),
        ParamSplit(e.down, 1 if transposed else 2, tuple((part.range(r),) for r in range(tp))),
    ]
    if getattr(mod, "has_bias", False):
        down = getattr(mod, e.down)
        splits.append(ParamSplit(gate_up_name + e.bias_suffix, 1, splits[0].ranges))
        hidden = down.shape[2] if transposed else down.shape[1]
        splits.append(ParamSplit(e.down + e.bias_suffix, 1,
                                 tuple(((0, hidden),) for _ in range(tp)),
                                 zero_off_rank0=True))
    return splits


def _rank_bytes(mod: nn.Module, tp: int, splits: list[ParamSplit]) -> tuple[int, ...]:
    """Bytes each rank holds of the split parameters."""
    out = []
    for r in range(tp):
        total = 0
        for sp in splits:
            t = getattr(mod, sp.param)
            per_row = t.numel() // t.shape[sp.dim] * t.element_size()
            total += per_row * ranges_len(sp.ranges[r])
        out.append(total)
    return tuple(out)


def normalised_inside(draft: Draft, name: str, hidden: int) -> str | None:
    """The module inside experts container ``name`` (or ``name`` itself) whose forward the
    probe saw normalise or reduce over ``hidden`` features, else None. Inside the container
    the down products are still partial sums (the all-reduce follows its output): a per-expert
    RMSNorm after the down product would normalise each rank's part alone."""
    for found in draft.graph.reduced_in.values():
        for size, where in found:
            if size == hidden and (where == name or where.startswith(name + ".")):
                return where
    return None


def plan_experts(draft: Draft) -> None:
    """Fused 3-D experts: split every expert's intermediate dimension (kept whole, with a
    reason, when the container's forward normalises the down products before returning)."""
    e = mt.EXPERT_PARAMS
    tp = draft.tp
    for name, mod in draft.modules.items():
        if not mt.is_fused_experts(mod) or name in draft.rules:
            continue
        transposed = bool(mod.is_transposed)
        down = getattr(mod, e.down)
        norm = normalised_inside(draft, name, down.shape[2 if transposed else 1])
        if norm is not None:
            draft.note(f"experts {collapse(name)} kept whole: its forward normalises the "
                       f"experts' outputs ({collapse(norm)}) before returning them, where a "
                       "split's products are still partial sums")
            continue
        inter = down.shape[1] if transposed else down.shape[2]
        part = Partition(split_aligned(inter, tp))
        splits = _param_splits(mod, tp, inter, part)
        draft.specs[name] = ModuleSpec(
            name, Role.EXPERTS, WeightKind.EXPERT_WEIGHTS,
            f"structure: {down.shape[0]} fused experts, intermediate size {inter} split",
            split=Split.IN, full=inter, ranges=tuple((part.range(r),) for r in range(tp)),
            weight_shape=tuple(down.shape), nbytes=_rank_bytes(mod, tp, splits),
            params=tuple(splits))
        if isinstance(mod.__dict__.get(e.intermediate_attr), int):
            draft.attr_updates.append(AttrUpdate(name, e.intermediate_attr, inter,
                                                 tuple(part.sizes)))
        hidden_dim = down.shape[2 if transposed else 1]
        draft.collectives.append(Collective("all_reduce", name, hidden_dim))
