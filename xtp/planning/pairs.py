"""Step 2 of planning: row/column pairs.

A Linear ``R`` whose input comes only from Linears ``S`` that feed nothing but ``R`` is a
row-parallel layer, and ``S`` its column-parallel partners; the pair shares one partition of the
inner dimension. A layer cannot be both a column and a row (the outer pair wins: a low-rank
projection in front of a column layer stays replicated). A pair whose inner activations pass
through a module with a parameter as wide as the inner dimension (a norm over all heads) is not
sharded: that module would need every head. A pair with a column whose output maps to no head or
fused layout is kept whole too (exact: replicated columns read full inputs, the replicated row
reads their full outputs) when it is more than a lone fused layer (:func:`_may_keep_whole`);
else it is refused.

Step 3, partitions: head-granular when the inner width is ``num_heads x head_dim`` (from the
config), else an even split (:mod:`xtp.planning.heads` for the columns' ranges and what changes
in the attention module).
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import PlanError, UnclassifiedModuleError
from . import model_table as mt
from .draft import Draft
from .fused import own_heads, splits_heads
from .head_params import plan_head_params
from .heads import attention_name, column_ranges, head_updates
from .layouts import q_ranges, ranges_len
from .norms import norm_kind
from .partition import HeadPartition, Partition, partition_heads, split_aligned
from .render import collapse
from .spec import Collective, ModuleSpec, ParamSplit, Ranges, Role, Split, WeightKind
from .weights import in_out


def find_pairs(draft: Draft) -> dict[str, list[str]]:
    """row layer -> its column partners (in call order), outer pairs only."""
    g = draft.graph
    pairs: dict[str, list[str]] = {}
    for r in g.order:
        if not draft.is_linear(r):
            continue
        cols = g.producers.get(r, set()) - draft.head_biases
        if cols and all(draft.is_linear(c) and g.consumers.get(c) == {r} for c in cols):
            pairs[r] = sorted(cols, key=g.order.index)
    changed = True
    while changed:
        changed = False
        columns = {c for cs in pairs.values() for c in cs}
        for r in list(pairs):
            if r in columns:
                del pairs[r]
                changed = True
    return pairs


def unsafe_reason(draft: Draft, row: str, cols: list[str]) -> str | None:
    """Why the pair cannot be sharded (a module over its whole inner dimension), or None."""
    widths = {in_out(draft.modules[c])[1] for c in cols} | {in_out(draft.modules[row])[0]}
    head_dim = draft.heads[2] if draft.heads else None
    norms = split_norms(draft, row, cols)
    for c in cols:
        for mod_name, shapes in draft.graph.inner.get(c, {}).items():
            if mod_name in norms:
                continue
            for shape in shapes:
                if any(d in widths and d != head_dim for d in shape):
                    return (f"{collapse(mod_name)} has a parameter of shape {shape} over "
                            f"the whole inner dimension of {collapse(c)}")
    H, K, _ = draft.heads if draft.heads else (0, 0, 0)
    for c in cols:  # heads taken in groups: a contiguous split would pair the wrong heads
        if (head_dim and in_out(draft.modules[c])[1] in (H * head_dim, K * head_dim)
                and splits_heads(draft.graph, c, head_dim)):
            return f"the forward takes some of the heads of {collapse(c)} apart from the others"
    for c in cols:  # a norm without parameters over all heads (``x / x.norm(dim=-1)``)
        wide = sorted(d for d, where in draft.graph.reduced_in.get(c, ()) if d in widths
                      and d != head_dim and where not in norms)
        if wide:
            return (f"the forward reduces activations of {collapse(c)} over {wide[0]} "
                    f"features (a norm over the whole inner dimension)")
    return None


def split_norms(draft: Draft, row: str, cols: list[str]) -> list[str]:
    """The modules between ``cols`` and ``row`` that are per-token norms over the row's whole
    input width (:func:`xtp.planning.norms.norm_kind`), seen by the forward on activations of
    these columns only, and not yet planned: split with the pair, statistics summed over the
    ranks. In call order. None when the row's weight is tied to another module (an LM head
    tied to the embeddings): that pair would be kept whole for the tie, and kept whole for the
    norm it leaves the head free to split by vocabulary."""
    width = in_out(draft.modules[row])[0]
    found: list[str] = []
    weight = getattr(draft.modules[row], "weight", None)
    if sum(p is weight for m in draft.model.modules() for p in m._parameters.values()) > 1:
        return found
    for c in cols:
        for mod_name in draft.graph.inner.get(c, {}):
            mod = draft.modules.get(mod_name)
            if mod_name in found or mod is None or mod_name in draft.specs:
                continue
            seen_by = {s for s, mods in draft.graph.inner.items() if mod_name in mods}
            if seen_by <= set(cols) and norm_kind(mod, width) is not None:
                found.append(mod_name)
    return found


def _plan_norms(draft: Draft, row: str, cols: list[str], width: int,
                row_ranges: list[Ranges]) -> None:
    """Specs of the pair's per-token norms (:func:`split_norms`): weight and bias cut like the
    row's input features; their gradients are whole on each rank (no partial-gradient sum)."""
    for name in split_norms(draft, row, cols):
        mod = draft.modules[name]
        params = dict(mod.named_parameters())
        splits = tuple(ParamSplit(p, 0, tuple(row_ranges)) for p in params)
        local = tuple(sum(ranges_len(rk) * t.element_size() for t in params.values())
                      for rk in row_ranges)
        draft.specs[name] = ModuleSpec(
            name, Role.NORM, WeightKind.PARAMS,
            f"structure: a per-token norm over the {width} inner features of "
            f"{collapse(row)}; statistics summed over the ranks",
            split=Split.OUT, full=width, ranges=tuple(row_ranges), group=row, params=splits,
            nbytes=local)
        passes = 2 if norm_kind(mod, width).kind == "layer" else 1  # mean, then variance
        draft.collectives.extend([Collective("all_reduce", name, 1)] * passes)
        full = {f"{name}.{p}" for p in params}
        draft.partial_grads[:] = [g for g in draft.partial_grads if g not in full]


def input_width_reason(draft: Draft, row: str, cols: list[str]) -> str | None:
    """Why the pair's activations must keep their full width (the forward reshapes them to a
    width read off another tensor's shape, its input's: it does not shrink with the heads), or
    None. Such a pair is sharded padded (:attr:`~xtp.planning.spec.ModuleSpec.padded`)."""
    widths = {in_out(draft.modules[c])[1] for c in cols} | {in_out(draft.modules[row])[0]}
    head_dim = draft.heads[2] if draft.heads else None
    for c in cols:
        wide = sorted(n for n, src in draft.graph.shape_sizes.get(c, ())
                      if n in widths and n != head_dim and not src <= set(cols))
        if wide:
            return (f"the forward reshapes activations of {collapse(c)} to {wide[0]} features "
                    f"read off the shape of another tensor (its input), a width that does not "
                    f"shrink with the heads")
    return None


def plan_pairs(draft: Draft) -> None:
    """Shard every pair no rule and no unsafe module keeps whole."""
    for row, cols in find_pairs(draft).items():
        ruled = [n for n in [row, *cols] if n in draft.rules]
        if ruled:
            for n in [row, *cols]:
                role, pattern = draft.rules.get(n, (Role.REPLICATE, None))
                draft.kept_whole[n] = (f"rule {pattern!r}" if pattern else
                                       f"rule on its partner {collapse(ruled[0])}")
            continue
        unsafe = unsafe_reason(draft, row, cols)
        if unsafe:
            for n in [row, *cols]:
                draft.kept_whole[n] = f"kept whole: {unsafe}"
            draft.note(f"{collapse(row)} and its partners kept replicated: {unsafe}")
            continue
        padded = input_width_reason(draft, row, cols)
        normed = bool(padded) and bool(split_norms(draft, row, cols))
        if normed:  # a norm between the layers would see the zero padding
            padded = f"{padded}, and a norm runs over those features"
        # no head partition: nothing shows the heads independent; or the norm above
        if padded and (draft.heads is None or normed):
            for n in [row, *cols]:
                draft.kept_whole[n] = f"kept whole: {padded}"
            draft.note(f"{collapse(row)} and its partners kept replicated: {padded}")
            continue
        if padded:
            draft.note(f"{collapse(row)} and its partners sharded padded (full-width activations, "
                       f"each rank's own heads, zeros elsewhere): {padded}")
        grads = len(draft.partial_grads)
        try:
            plan_pair(draft, row, cols, padded=bool(padded))
        except UnclassifiedModuleError as exc:
            if not _may_keep_whole(draft, row, cols):
                raise
            del draft.partial_grads[grads:]  # nothing of the pair is sharded after all
            why = str(exc).split(": it looks like", 1)[0]
            for n in [row, *cols]:
                draft.kept_whole[n] = f"kept whole: {why}"
            draft.note(f"{collapse(row)} and its partners kept replicated: {why} (the "
                       "forward shows no layout xtp can split)")


def _may_keep_whole(draft: Draft, row: str, cols: list[str]) -> bool:
    """True when a pair with a column of no known layout is kept whole rather than refused:
    the head counts come from the config (not guessed from the forward, where a wrong guess is
    the likelier cause and the refusal says how to pass them), and the pair is more than one
    fused layer and its row: several columns, or a parent module holding parameters besides
    the pair's (a convolution, decay rates, norms: a mixer xtp does not model, whose inputs and
    outputs stay full when the whole pair is replicated). A lone fused column in a bare parent
    is a layout xtp should learn: refused, so that it is reported."""
    if draft.heads is not None and mt.head_shape(draft.config) is None:
        return False
    if len(cols) > 1:
        return True
    parent = draft.modules.get(attention_name(row, cols))
    own = {id(p) for n in [row, *cols] for p in draft.modules[n].parameters()}
    return parent is not None and any(id(p) not in own for p in parent.parameters())


def _own_head_widths(draft: Draft, cols: list[str]) -> dict[str, tuple[int, int]] | None:
    """column -> (heads, head width) when every column's output is viewed by the forward into
    query or KV heads of its own width, at least one into the query heads (multi-head latent
    attention: per-head up-projections wider than the config's head size); else ``None``."""
    H, K, _ = draft.heads
    found = {c: own_heads(draft.graph, c, (H, K), in_out(draft.modules[c])[1]) for c in cols}
    if any(v is None for v in found.values()) or all(v[0] != H for v in found.values()):
        return None
    return found


def _inner_partition(draft: Draft, row: str, width: int, cols: list[str]
                     ) -> tuple[HeadPartition | None, Partition | None, list[Ranges], str,
                                dict[str, tuple[int, int]] | None]:
    """(head partition or None, even partition or None, the row's ranges per rank, a word on
    what is split, each column's own (heads, head width) or None) for a row layer with
    ``width`` input features fed by ``cols``."""
    H, K, D = draft.heads if draft.heads else (0, 0, 0)
    if draft.heads and width == H * D:
        hp = partition_heads(H, K, draft.tp)
        return hp, None, [q_ranges(hp, D, r) for r in range(draft.tp)], "attention heads", None
    own = _own_head_widths(draft, cols) if draft.heads and width % H == 0 else None
    if own is not None:
        hp = partition_heads(H, K, draft.tp)
        return (hp, None, [q_ranges(hp, width // H, r) for r in range(draft.tp)],
                "attention heads, each layer its own head width", own)
    if draft.graph.producers.get(row, set()) & draft.head_biases:
        raise PlanError(f"{collapse(row)} reads per-head biases but its {width} input "
                        f"features are not num_heads x head_dim ({H} x {D})")
    mlp = Partition(split_aligned(width, draft.tp))
    if min(mlp.sizes) == 0:
        raise PlanError(f"{collapse(row)} has {width} input features, fewer than tp")
    return None, mlp, [(mlp.range(r),) for r in range(draft.tp)], f"{width} features", None


def _note_partial_grads(draft: Draft, cols: list[str]) -> None:
    """Parameters of modules inside the pair (between column and row) see sharded activations."""
    for c in cols:
        for mod_name in draft.graph.inner.get(c, {}):
            for pname, _ in draft.modules[mod_name].named_parameters(recurse=False):
                full = f"{mod_name}.{pname}" if mod_name else pname
                if full not in draft.partial_grads:
                    draft.partial_grads.append(full)


def plan_pair(draft: Draft, row: str, cols: list[str], padded: bool = False) -> None:
    """Specs of one row layer and its columns, its all-reduce, and the head updates when the
    inner dimension is attention heads. ``padded``: the activations between them keep their
    full width (each rank's own features at their places, zeros elsewhere; the row reads only
    its own), so no head count, per-head parameter or keyword input of the module changes.

    Raises:
        PlanError: the row's input features cannot be split over ``tp`` ranks.
        UnclassifiedModuleError: a column's width matches no known layout.
    """
    width = in_out(draft.modules[row])[0]
    hp, mlp, row_ranges, kind, own = _inner_partition(draft, row, width, cols)
    _note_partial_grads(draft, cols)
    try:
        col_ranges = [column_ranges(draft, c, width, hp, mlp, own and own[c]) for c in cols]
    except UnclassifiedModuleError:
        # the row is num_heads x head_dim wide, but a column matches neither the heads nor a
        # fused layout: its own head width, when the forward views every column into heads
        own = _own_head_widths(draft, cols) if hp is not None and own is None else None
        if own is None:
            raise
        kind = "attention heads, each layer its own head width"
        col_ranges = [column_ranges(draft, c, width, hp, mlp, own[c]) for c in cols]
    col_specs = []
    for c, (layout, ranges) in zip(cols, col_ranges):
        col_specs.append(draft.spec(
            c, Role.COLUMN, f"structure: feeds only {collapse(row)} (split by {kind})",
            split=Split.OUT, ranges=ranges, layout=layout, group=row))
    row_spec = draft.spec(
        row, Role.ROW, "structure: reads only "
        + ", ".join(collapse(c).rsplit(".", 1)[-1] for c in cols),
        split=Split.IN, ranges=row_ranges, group=row)
    if padded:
        col_specs = [replace(s, padded=True) for s in col_specs]
        row_spec = replace(row_spec, padded=True)
    for s in col_specs:
        draft.specs[s.name] = s
    draft.specs[row] = row_spec
    draft.collectives.append(Collective("all_reduce", row, in_out(draft.modules[row])[1]))
    if padded:
        return
    _plan_norms(draft, row, cols, width, row_ranges)
    plan_head_params(draft, attention_name(row, cols), cols, width, row_ranges, hp)
    if hp is not None:
        head_updates(draft, row, cols, hp, own)

