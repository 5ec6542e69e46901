"""Per-head parameters of the module that holds a row/column pair: split with the pair's heads.

An attention module may own parameters with one entry per head (attention sinks, a per-head
gate bias, a per-head mixing weight) or one entry per inner feature (a bias added to the query
heads, a per-feature scale of the gate activations), which its forward combines with the
pair's column outputs. Once the columns hold only this rank's heads (features), such a
parameter must hold only them too, in the same order.

Found from the forward, never from names: a 1-D parameter of the pair's enclosing module
(the longest module path the row and its columns share) that the probe saw meet activations
of the pair's columns and no other layer's (:attr:`~xtp.planning.probe.FlowGraph.param_uses`),
whose length is the number of query heads, of KV heads, or the inner width (query or KV
features). Every other parameter stays whole; one used in another way makes the shard()
safety net refuse, never a wrong result.
"""

from __future__ import annotations

from dataclasses import replace

from .draft import Draft
from .layouts import kv_ranges, q_ranges, ranges_len
from .partition import HeadPartition
from .probe import INPUT
from .spec import ModuleSpec, ParamSplit, Ranges, Role, Split, WeightKind
from .weights import nbytes


def _ranges(n: int, width: int, row_ranges: list[Ranges], hp: HeadPartition | None,
            heads: tuple[int, int, int] | None) -> list[Ranges] | None:
    """Per-rank ranges of a 1-D parameter of length ``n`` (None: not per head/feature)."""
    tp = len(row_ranges)
    if n == width:
        return row_ranges
    if hp is None or heads is None:
        return None
    H, K, D = heads
    if n == H:
        return [q_ranges(hp, 1, r) for r in range(tp)]
    if n == K:
        return [kv_ranges(hp, 1, r) for r in range(tp)]
    if n == K * D:
        return [kv_ranges(hp, D, r) for r in range(tp)]
    return None


def _holder_spec(draft: Draft, name: str, cols: list[str], width: int,
                 row_ranges: list[Ranges], hp: HeadPartition | None) -> ModuleSpec | None:
    """The spec of module ``name`` splitting its per-head parameters (None: it has none)."""
    mod = draft.modules.get(name)
    if mod is None:  # a module shared under several paths: never split
        return None
    allowed = set(cols) | {INPUT}
    head_dim = draft.heads[2] if draft.heads else 0
    splits, local = [], [0] * draft.tp
    for pname, p in mod.named_parameters(recurse=False):
        uses = draft.graph.param_uses.get(f"{name}.{pname}" if name else pname, set())
        n = p.shape[0] if p.dim() == 1 else 0
        ranges = (_ranges(n, width, row_ranges, hp, draft.heads)
                  if n and n != head_dim and uses & set(cols) and uses <= allowed else None)
        if ranges is None:
            local = [b + nbytes(p) for b in local]
            continue
        splits.append(ParamSplit(pname, 0, tuple(ranges)))
        local = [b + ranges_len(rk) * p.element_size() for b, rk in zip(local, ranges)]
    if not splits:
        return None
    names = ", ".join(s.param for s in splits)
    return ModuleSpec(
        name, Role.HEAD_PARAMS, WeightKind.PARAMS,
        f"structure: its forward applies {names} per head (feature) to its pair's columns",
        split=Split.OUT, full=width, ranges=tuple(row_ranges), params=tuple(splits),
        nbytes=tuple(local))


def plan_head_params(draft: Draft, name: str, cols: list[str], width: int,
                     row_ranges: list[Ranges], hp: HeadPartition | None) -> None:
    """Split the per-head parameters of module ``name`` enclosing a pair with columns ``cols``
    (and of its inner helpers that are no shardable layer), ``width`` inner features cut as
    ``row_ranges`` (heads ``hp`` or an even split). A parameter as long as one head
    (``head_dim``: a per-head norm) is never split."""
    mod = draft.modules.get(name)
    if not name or mod is None:
        return
    for holder, _ in mod.named_modules(prefix=name):
        if holder in draft.kinds or holder in draft.specs:
            continue
        spec = _holder_spec(draft, holder, cols, width, row_ranges, hp)
        if spec is not None:
            draft.specs[holder] = spec


def plan_output_params(draft: Draft) -> None:
    """A layer split by output features (column, LM head) keeps the matching slice of its own
    other 1-D parameters as long as its output (and not its input) that its forward uses: a
    per-output scale of a Linear subclass (``logits * logit_scale``)."""
    for name, spec in list(draft.specs.items()):
        if spec.split != Split.OUT or spec.kind not in (WeightKind.OUT_IN, WeightKind.IN_OUT):
            continue
        mod = draft.modules[name]
        extra = [ParamSplit(p, 0, spec.ranges) for p, t in mod.named_parameters(recurse=False)
                 if p not in ("weight", "bias") and t.dim() == 1 and t.shape[0] == spec.full
                 and t.shape[0] != mod.weight.numel() // spec.full
                 and draft.graph.param_uses.get(f"{name}.{p}")]
        if extra:
            size = {s.param: getattr(mod, s.param).element_size() for s in extra}
            nb = tuple(b + sum(ranges_len(s.ranges[r]) * size[s.param] for s in extra)
                       for r, b in enumerate(spec.nbytes))
            draft.specs[name] = replace(spec, params=spec.param_splits() + tuple(extra),
                                        nbytes=nb)
